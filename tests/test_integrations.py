"""Lightning and Hugging Face Trainer integrations, run with the real trainers on tiny CPU models."""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from gearshift.integrations.lightning import (  # noqa: E402
    GradientSignCallback,
    MonitoredLR,
    PhaseSchedulerCallback,
    configure_lr_scheduler,
)
from gearshift.integrations.transformers import (  # noqa: E402
    SIGNS_FILE,
    PhaseLossMixin,
    PhaseSchedulerTrainerCallback,
)
from gearshift.lora import attach_lora, lora_layers  # noqa: E402
from gearshift.schedules import GearshiftLR, ScheduleError, lr_multiplier  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*The number of training batches.*:UserWarning",
)

# Phases that move on by max_steps: deterministic transitions at optimizer steps 3 and 6; the
# last phase halves the LR.
PHASES = {
    "window": 50,
    "phases": [
        {"name": "foundation", "alpha": 4, "min_steps": 0, "max_steps": 3},
        {"name": "balance", "alpha": 8, "min_steps": 0, "max_steps": 3},
        {"name": "emphasis", "alpha": 16, "lr_scale": 0.5},
    ],
}


def scales(model: nn.Module) -> set[float]:
    return {float(layer.scaling["default"]) for _, layer, _, _ in lora_layers(model)}


# ---------------------------------------------------------------------------------- Lightning


class TinyModule(pl.LightningModule):
    """A LoRA-wrapped MLP; records each micro-batch's loss, LR and LoRA scale."""

    def __init__(self, *, lr: float = 0.05, lora: bool = True, schedule: dict | None = None):
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.model = attach_lora(net, r=2, alpha=4, target_modules=["0", "2"]) if lora else net
        self.lr, self.schedule = lr, schedule
        self.losses: list[float] = []
        self.scales: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        self.losses.append(loss.item())
        self.scales.extend(sorted(scales(self.model))[:1])
        self.log("flat", 1.0, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr)
        if self.schedule is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": configure_lr_scheduler(opt, **self.schedule)}


class LRRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def loader(n: int = 16, *, same: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.ones(n, 4) if same else torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True) / 4), batch_size=2, shuffle=False)


def lightning_trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, callbacks=callbacks, **kwargs)


def test_configure_lr_scheduler_follows_the_closed_form_inside_lightning(tmp_path):
    shape = {"name": "warmup_cosine", "total_steps": 8, "warmup_steps": 3, "min_lr_ratio": 0.1}
    module, recorder = TinyModule(schedule=shape), LRRecorder()
    trainer = lightning_trainer(tmp_path, [recorder], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(module, loader())
    assert trainer.global_step == 8
    expected = [0.05 * lr_multiplier(step=k, **shape) for k in range(8)]
    assert recorder.lrs == expected  # exact: one scheduler step per optimizer step
    entry = trainer.lr_scheduler_configs[0]
    assert (entry.interval, entry.frequency, entry.reduce_on_plateau) == ("step", 1, False)
    assert type(entry.scheduler) is GearshiftLR


def test_plateau_schedule_reduces_the_lr_on_the_monitored_metric(tmp_path):
    shape = {"name": "plateau", "total_steps": 4, "monitor": "flat", "patience": 0}
    module, recorder = TinyModule(schedule=shape), LRRecorder()
    trainer = lightning_trainer(tmp_path, [recorder], max_epochs=4, limit_train_batches=2)
    trainer.fit(module, loader())
    # "flat" is 1.0 every epoch: the first report sets the best, each later one is a bad epoch.
    assert recorder.lrs == [0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]
    entry = trainer.lr_scheduler_configs[0]
    assert (entry.interval, entry.monitor, entry.reduce_on_plateau) == ("epoch", "flat", True)
    assert entry.scheduler.plateau.num_reductions == 3  # the end of epoch 3 reduced as well


def test_configure_lr_scheduler_reports_every_bad_argument():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ScheduleError) as err:
        configure_lr_scheduler(opt, name="plateau", total_steps=4, interval="hour", frequency=0)
    assert {p.path for p in err.value.problems} == {"interval", "frequency", "monitor"}
    with pytest.raises(ScheduleError, match="only the 'plateau' schedule watches a metric"):
        configure_lr_scheduler(opt, name="cosine", total_steps=4, monitor="val_loss")
    with pytest.raises(ScheduleError, match="total_steps"):
        configure_lr_scheduler(opt, name="linear", total_steps=0)
    sched = configure_lr_scheduler(opt, name="Adaptive", total_steps=4, monitor="m",
                                   patience=0)["scheduler"]
    assert isinstance(sched, MonitoredLR)
    for _ in range(2):
        opt.step()
        sched.step(2.0)
    assert sched.get_last_lr() == [0.5] and sched.last_epoch == 2


def run_lightning(root: Path, *, max_epochs: int, ckpt_path: Path | None = None,
                  phases: PhaseSchedulerCallback | None = None):
    module, recorder = TinyModule(), LRRecorder()
    phases = phases or PhaseSchedulerCallback(PHASES)
    trainer = lightning_trainer(root, [GradientSignCallback(), phases, recorder],
                                max_epochs=max_epochs, accumulate_grad_batches=2)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    module.lrs = recorder.lrs
    return module, phases, trainer


def test_lightning_phases_step_once_per_optimizer_step_and_resume_exactly(tmp_path):
    # 8 micro-batches per epoch, accumulated by 2: 4 optimizer steps per epoch, 12 in all.
    module, phases, trainer = run_lightning(tmp_path / "full", max_epochs=3)
    ctl = phases.controller
    assert [(t["step"], t["to_phase"], t["reason"]) for t in ctl.transition_history] == [
        (3, "balance", "max_steps"), (6, "emphasis", "max_steps")]
    assert ctl.total_steps == trainer.global_step == 12 and ctl.steps_in_phase == 6
    # The alphas took effect in the forward passes: scale = alpha / r, r = 2.
    assert module.scales == [2.0] * 6 + [4.0] * 6 + [8.0] * 12
    assert phases.alphas == {"linear": 16.0}
    assert module.lrs == [0.05] * 6 + [0.025] * 6  # lr_scale 0.5 in the last phase
    assert phases.last_loss == pytest.approx(sum(module.losses[-2:]) / 2, rel=1e-6)
    assert phases.last_stability is not None and 0.0 <= phases.last_stability <= 1.0
    metrics = trainer.callback_metrics
    assert float(metrics["phase/index"]) == 2.0 and float(metrics["alpha/linear"]) == 16.0
    assert "grad_stability" in metrics

    # Stop after epoch 1 (step 4, one step into "balance"), then resume from the checkpoint.
    _, first, trainer_a = run_lightning(tmp_path / "a", max_epochs=1)
    ckpt = tmp_path / "a.ckpt"
    trainer_a.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    state = saved[first.state_key]["phases"]
    assert (state["phase_index"], state["steps_in_phase"], state["last_step"]) == (1, 1, 4)
    assert saved[GradientSignCallback().state_key]["json"]["has_signs"]
    resumed_module, resumed, _ = run_lightning(tmp_path / "b", max_epochs=3, ckpt_path=ckpt)
    assert resumed_module.scales[0] == 4.0  # the restored phase's alpha, before the first step
    assert resumed_module.lrs == module.lrs[4:]
    assert resumed.controller.state_dict() == ctl.state_dict()  # bit-identical decisions


def test_lightning_checkpoint_without_phase_state_starts_at_phase_0(tmp_path):
    module = TinyModule()
    trainer = lightning_trainer(tmp_path, [], max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(module, loader())
    ckpt = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="no phase-controller state.*phase 0 \\(foundation\\)"):
        _, phases, _ = run_lightning(tmp_path, max_epochs=2, ckpt_path=ckpt)
    ctl = phases.controller
    assert (ctl.total_steps, ctl.last_step, ctl.phase_index) == (4, 8, 1)  # steps 5..8 only


def test_lightning_phase_lr_scale_multiplies_a_gearshift_schedule(tmp_path):
    shape = {"name": "linear", "total_steps": 8}
    config = {"window": 50, "phases": [{"name": "a", "min_steps": 0, "max_steps": 2},
                                       {"name": "b", "lr_scale": 0.25}]}
    module, recorder = TinyModule(schedule=shape), LRRecorder()
    trainer = lightning_trainer(tmp_path, [PhaseSchedulerCallback(config), recorder], max_steps=6)
    trainer.fit(module, loader())
    expected = [0.05 * lr_multiplier(step=k, **shape) * (1.0 if k < 2 else 0.25) for k in range(6)]
    assert recorder.lrs == expected


def test_lightning_flat_loss_transitions_by_the_criteria(tmp_path):
    config = {"window": 4, "patience": 2, "phases": [
        {"name": "a", "alpha": 1, "min_steps": 0, "exit": {"min_gradient_stability": 0.9}},
        {"name": "b", "alpha": 2}]}
    phases = PhaseSchedulerCallback(config)
    trainer = lightning_trainer(tmp_path, [GradientSignCallback(), phases], max_steps=8)
    trainer.fit(TinyModule(lr=0.0, lora=False), loader(same=True))  # loss exactly flat
    (record,) = phases.controller.transition_history
    assert record["reason"] == "plateau" and record["step"] == 5  # window full at 4, 2 passes
    stability = next(c for c in record["criteria"] if "stability" in c["criterion"])
    assert stability["result"] == "pass" and stability["value"] == 1.0
    assert phases.alphas == {"all": 2.0}  # no LoRA layers: the configured alpha is reported


def test_lightning_integration_without_lightning_says_how_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "gearshift.integrations.lightning"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "lightning", None)
    with pytest.raises(ImportError, match=r"pip install 'gearshift\[lightning\]'"):
        importlib.import_module("gearshift.integrations.lightning")


# --------------------------------------------------------------------------- Hugging Face


def hf_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32)
    return attach_lora(LlamaForCausalLM(config), r=4, alpha=4, target_modules=["q_proj", "v_proj"])


def hf_trainer(output_dir: Path, callbacks: list, *, trainer_cls=None, model=None, **kwargs):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (32, 8), generator=g)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}
            for row in ids]
    options = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
               "max_steps": 8, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 4,
               "seed": 0, **kwargs}
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to=[],
                             disable_tqdm=True, **options)
    return (trainer_cls or Trainer)(model=model or hf_model(), args=args, train_dataset=data,
                                    callbacks=callbacks)


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """One uninterrupted 8-step run, loss taken from the logs (logging_steps=1)."""
    out = tmp_path_factory.mktemp("hf")
    callback = PhaseSchedulerTrainerCallback(PHASES)
    trainer = hf_trainer(out, [callback])
    trainer.train()
    return out, callback, trainer


def test_hf_trainer_phases_alphas_and_checkpoint_state(hf_reference):
    out, callback, trainer = hf_reference
    ctl = callback.controller
    assert [(t["step"], t["to_phase"]) for t in ctl.transition_history] == [
        (3, "balance"), (6, "emphasis")]
    assert ctl.total_steps == trainer.state.global_step == 8
    assert scales(trainer.model) == {4.0}  # alpha 16 / r 4
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 8 and callback.last_loss == logged[-1]
    assert callback.last_stability is not None
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == trainer.lr_scheduler.get_last_lr()[0] * 0.5  # emphasis: lr_scale 0.5
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["PhaseSchedulerTrainerCallback"]["attributes"]
    phases = saved["gearshift_state"]["phases"]
    assert (phases["phase_index"], phases["steps_in_phase"], phases["last_step"]) == (1, 1, 4)
    assert (out / "checkpoint-4" / SIGNS_FILE).is_file()


@pytest.mark.parametrize("restore_flag", [False, True])
def test_hf_trainer_resume_continues_exactly(hf_reference, restore_flag):
    out, reference, _ = hf_reference
    expected = reference.controller.state_dict()
    callback = PhaseSchedulerTrainerCallback(PHASES)
    trainer = hf_trainer(out, [callback], restore_callback_states_from_checkpoint=restore_flag)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "gradient signs not found|.*phase-controller state")
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    live = [c for c in trainer.callback_handler.callbacks
            if isinstance(c, PhaseSchedulerTrainerCallback)]
    assert len(live) == 1
    # With the flag, transformers swaps in a rebuilt instance; without it, ours restores itself.
    assert (live[0] is callback) is not restore_flag
    assert live[0].controller.state_dict() == expected
    assert scales(trainer.model) == {4.0}


def test_hf_loss_from_sparse_logs_warns_once(tmp_path):
    callback = PhaseSchedulerTrainerCallback({"window": 50, "phases": [{"name": "a"}, {"name": "b"}]})
    trainer = hf_trainer(tmp_path, [callback], max_steps=4, logging_steps=2, save_strategy="no")
    with pytest.warns(UserWarning, match="one mean loss per logging interval") as caught:
        trainer.train()
    assert sum("PhaseSchedulerTrainerCallback takes" in str(w.message) for w in caught) == 1
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    ctl = callback.controller
    assert ctl.total_steps == 4 and callback.last_loss == logged[-1]
    assert ctl.status()["statistics"]["n"] == 2  # a loss on steps 2 and 4 only


def test_hf_loss_mixin_feeds_every_step_whatever_logging_steps(hf_reference, tmp_path):
    from transformers import Trainer

    class MixTrainer(PhaseLossMixin, Trainer):
        pass

    _, reference, _ = hf_reference
    callback = PhaseSchedulerTrainerCallback(PHASES)
    trainer = hf_trainer(tmp_path, [callback], trainer_cls=MixTrainer, logging_steps=5,
                         save_strategy="no")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "PhaseSchedulerTrainerCallback takes the loss")
        trainer.train()
    # The same losses and stabilities as the run fed from per-step logs.
    assert callback.controller.state_dict() == reference.controller.state_dict()
