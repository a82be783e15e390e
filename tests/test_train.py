"""The training loop: accumulation, clipping, precision, checkpointing of activations, logging."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import gearshift as gs
from gearshift.tasks import CausalLMLoss
from gearshift.train.memory import enable_gradient_checkpointing


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=32))


def masked_lm_data(n: int, seq_len: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences whose number of target tokens differs per sample (to test token weighting)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(0, 64, (seq_len,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % (seq_len - 2)] = -100
        items.append({"input_ids": ids, "labels": labels})
    return items


def base_cfg(tmp_path: Path, **training: Any) -> dict[str, Any]:
    return {
        "output_dir": str(tmp_path / "runs"), "seed": 3,
        "optim": {"learning_rate": 1e-2},
        "schedule": {"name": "constant"},
        "training": {"grad_clip": None, "eval_every": None, "log_every": 1, **training},
        "checkpoint": {"enabled": False},
        "logging": {"progress_bar": False, "tensorboard": False},
    }


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def fit_lm(tmp_path: Path, data: list, optim: str = "sgd", **training: Any,
           ) -> tuple[dict, gs.RunResult]:
    # SGD by default: the update is linear in the gradient, so equal gradients give equal
    # weights to float tolerance (Adam's g/sqrt(v) amplifies rounding in near-zero gradients).
    model = tiny_llama()
    cfg = base_cfg(tmp_path, **training)
    cfg["optim"] = {"name": optim, "learning_rate": 0.5 if optim == "sgd" else 1e-2}
    result = gs.Trainer(model, data, cfg, loss_fn=CausalLMLoss()).fit()
    return weights(model), result


def test_accumulation_equals_one_big_batch_token_weighted(tmp_path: Path) -> None:
    data = masked_lm_data(32)
    big, _ = fit_lm(tmp_path, data, batch_size=8, accumulate_grad_batches=1, max_steps=4)
    small, _ = fit_lm(tmp_path, data, batch_size=2, accumulate_grad_batches=4, max_steps=4)
    start = weights(tiny_llama())
    assert any(not torch.equal(start[k], big[k]) for k in big)  # training moved the weights
    assert_same_weights(big, small)


def test_short_last_window_is_scaled_by_its_real_size(tmp_path: Path) -> None:
    # 24 samples, micro-batch 4, accumulation 4: each epoch is a window of 16 and one of 8.
    data = masked_lm_data(24, seed=1)
    big, r1 = fit_lm(tmp_path, data, batch_size=16, accumulate_grad_batches=1, epochs=2)
    small, r2 = fit_lm(tmp_path, data, batch_size=4, accumulate_grad_batches=4, epochs=2)
    assert r1.step == r2.step == 4
    assert_same_weights(big, small)


class CountingLinear(nn.Linear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([CountingLinear(6, 6), CountingLinear(6, 6)])
        self.head = nn.Linear(6, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        for block in self.blocks:
            x = torch.tanh(block(x))
        out = self.head(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, y), "pred": out}


def regression_data(n: int = 20) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = x.sum(-1)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def test_plain_module_mean_loss_accumulates_by_samples(tmp_path: Path) -> None:
    data = regression_data(20)  # 20 samples: batch 8 -> 8, 8, 4 (a short last batch)
    m1, m2 = MLP(), MLP()
    gs.Trainer(m1, data, base_cfg(tmp_path, batch_size=10, epochs=2)).fit()
    gs.Trainer(m2, data, base_cfg(tmp_path, batch_size=5, accumulate_grad_batches=2,
                                  epochs=2)).fit()
    assert_same_weights(weights(m1), weights(m2))


def test_clip_by_norm_logs_pre_clip_norm_and_clips(tmp_path: Path) -> None:
    data = regression_data(8)
    model = MLP()
    before = weights(model)
    cfg = base_cfg(tmp_path, batch_size=8, max_steps=1, grad_clip=0.01)
    cfg["optim"] = {"name": "sgd", "learning_rate": 1.0}
    result = gs.Trainer(model, data, cfg).fit()
    # The update of plain SGD with lr 1 is minus the clipped gradient, so its norm is the clip.
    delta = torch.cat([(before[k] - v).flatten() for k, v in weights(model).items()])
    assert delta.norm().item() == pytest.approx(0.01, rel=1e-4)
    # The logged norm is the norm *before* clipping: recompute it by hand.
    ref = MLP()
    batch = torch.utils.data.default_collate(data)
    ref(**batch)["loss"].backward()
    expected = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert metrics[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01


def test_clip_by_value(tmp_path: Path) -> None:
    model = MLP()
    before = weights(model)
    cfg = base_cfg(tmp_path, batch_size=8, max_steps=1, grad_clip=1e-3,
                   grad_clip_algorithm="value")
    cfg["optim"] = {"name": "sgd", "learning_rate": 1.0}
    gs.Trainer(model, regression_data(8), cfg).fit()
    delta = torch.cat([(before[k] - v).flatten() for k, v in weights(model).items()])
    assert delta.abs().max().item() == pytest.approx(1e-3, rel=1e-5)


def test_gradient_checkpointing_same_result_hf(tmp_path: Path) -> None:
    data = masked_lm_data(16)
    plain, _ = fit_lm(tmp_path, data, batch_size=4, max_steps=3)
    ckpt, _ = fit_lm(tmp_path, data, batch_size=4, max_steps=3, gradient_checkpointing=True)
    assert_same_weights(plain, ckpt, atol=1e-6)


def test_gradient_checkpointing_plain_module_recomputes() -> None:
    a, b = MLP(), MLP()
    assert enable_gradient_checkpointing(b) == "2 blocks"
    batch = torch.utils.data.default_collate(regression_data(4))
    a(**batch)["loss"].backward()
    b(**batch)["loss"].backward()
    assert a.blocks[0].calls == 1
    assert b.blocks[0].calls == 2  # once in forward, once recomputed in backward
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_gradient_checkpointing_without_blocks_is_a_config_error() -> None:
    with pytest.raises(gs.ConfigError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains(tmp_path: Path, precision: str) -> None:
    data = masked_lm_data(32)
    _, result = fit_lm(tmp_path, data, "adamw", batch_size=8, max_steps=8, precision=precision)
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").open()
              if "loss" in json.loads(x)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


class Recorder(gs.Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.count = 0

    def on_train_start(self, trainer: gs.Trainer) -> None:
        self.events.append("start")

    def on_step_end(self, trainer: gs.Trainer, metrics: dict) -> None:
        self.count += 1
        self.events.append(f"step{trainer.step}")

    def on_eval(self, trainer: gs.Trainer, metrics: dict) -> None:
        self.events.append(f"eval{trainer.step}:{metrics['eval/loss']:.1f}")

    def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
        self.events.append(f"ckpt:{path.name}")

    def on_train_end(self, trainer: gs.Trainer, result: gs.RunResult) -> None:
        self.events.append("end")

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def test_run_directory_metrics_events_and_callbacks(tmp_path: Path) -> None:
    data, held_out = masked_lm_data(24), masked_lm_data(6, seed=9)
    cfg = base_cfg(tmp_path, batch_size=4, max_steps=4, eval_every=2, log_every=2)
    cfg["checkpoint"] = {"enabled": True, "every": 2, "keep_last": 5}
    cfg["logging"] = {"progress_bar": False, "tensorboard": True}
    rec = Recorder()
    model = tiny_llama()
    result = gs.Trainer(model, data, cfg, loss_fn=CausalLMLoss(), eval_data=held_out,
                        callbacks=[rec]).fit()
    run = result.run_dir
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "overrides.json", "metrics.jsonl",
                                               "events.jsonl", "tensorboard", "checkpoints",
                                               "final"}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [2, 4]
    assert set(train_lines[0]) >= {"step", "loss", "loss_avg", "lr", "grad_norm",
                                   "tokens_per_s", "epoch"}
    evals = [m for m in lines if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    assert evals[-1]["eval/ppl"] == pytest.approx(math.exp(evals[-1]["eval/loss"]))
    assert result.metrics["eval/loss"] == evals[-1]["eval/loss"]
    assert result.metrics["eval/loss_before"] == evals[0]["eval/loss"]
    events = [json.loads(x)["event"] for x in (run / "events.jsonl").open()]
    assert events[0] == "start" and events[-1] == "end" and events.count("checkpoint") == 2
    assert rec.events[0] == "start" and rec.events[-1] == "end"
    assert rec.events.index("step2") < rec.events.index("ckpt:step-00000002")
    state = json.loads((run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["callbacks"] == {"Recorder": {"count": 4}}
    assert state["step"] == 4


def test_model_without_loss_needs_loss_fn(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
    data = [torch.randn(6) for _ in range(8)]
    with pytest.raises(TypeError, match="pass loss_fn"):
        gs.Trainer(model, data, base_cfg(tmp_path, batch_size=4, max_steps=1)).fit()


def test_loss_fn_mean_loss(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    g = torch.Generator().manual_seed(0)
    data = [(x, x.sum()) for x in torch.randn(32, 6, generator=g)]

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(m(x).squeeze(-1), y)

    result = gs.Trainer(model, data, base_cfg(tmp_path, batch_size=8, epochs=20),
                        loss_fn=loss_fn).fit()
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").open()]
    assert result.step == 80
    assert losses[-1] < 0.5 * losses[0]


def test_plateau_schedule_reduces_lr_on_stalled_eval_loss(tmp_path: Path) -> None:
    # A tiny learning rate keeps the eval loss flat, so every evaluation after warmup is "bad".
    data, held_out = masked_lm_data(32), masked_lm_data(8, seed=5)
    cfg = base_cfg(tmp_path, batch_size=8, max_steps=12, eval_every=2)
    cfg["optim"] = {"name": "sgd", "learning_rate": 1e-9}
    cfg["schedule"] = {"name": "plateau", "warmup_steps": 2, "min_lr_ratio": 0.1,
                       "options": {"factor": 0.5, "patience": 0, "threshold": 0.01}}
    result = gs.Trainer(tiny_llama(), data, cfg, loss_fn=CausalLMLoss(), eval_data=held_out).fit()
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").open()]
    reductions = [e for e in events if e["event"] == "lr_reduced"]
    assert len(reductions) >= 3
    lrs = [json.loads(x)["lr"] for x in (result.run_dir / "metrics.jsonl").open()
           if "lr" in json.loads(x)]
    assert lrs[-1] == pytest.approx(1e-10)  # halved down to the floor: 0.1 x peak
    assert all(b <= a for a, b in zip(lrs[2:], lrs[3:], strict=False))


def test_schedule_per_epoch(tmp_path: Path) -> None:
    # 32 samples / batch 8 = 4 steps an epoch; 4 epochs; warmup 1 epoch, then linear to 0.
    cfg = base_cfg(tmp_path, batch_size=8, epochs=4)
    cfg["schedule"] = {"name": "linear", "interval": "epoch", "warmup_epochs": 1,
                       "min_lr_ratio": 0.0}
    result = gs.Trainer(tiny_llama(), masked_lm_data(32), cfg, loss_fn=CausalLMLoss()).fit()
    lrs = [json.loads(x)["lr"] for x in (result.run_dir / "metrics.jsonl").open()
           if "lr" in json.loads(x)]
    peak = cfg["optim"]["learning_rate"]
    expected = [0.0] * 4 + [peak] * 4 + [peak * 2 / 3] * 4 + [peak / 3] * 4
    assert lrs == pytest.approx(expected)


def test_train_from_a_local_model_directory(tmp_path: Path, make_config) -> None:
    from gearshift.data import byte_level_tokenizer

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16,
                                        intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        eos_token_id=tok.eos_token_id))
    model_dir = tmp_path / "base"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = make_config(training={"max_steps": 6})
    cfg["model"] = {"path": str(model_dir)}
    result = gs.train(cfg)
    assert result.metrics["eval/loss"] < result.metrics["eval/loss_before"]
    trained = LlamaForCausalLM.from_pretrained(result.run_dir / "final")
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)

    (model_dir / "config.json").unlink()
    with pytest.raises(gs.ModelError, match=r"not valid \(1 problem\):\n  - config.json is missing"):
        gs.train(cfg)


def test_model_directory_with_missing_shards_lists_them(tmp_path: Path) -> None:
    from gearshift.config import ModelConfig
    from gearshift.tasks import build_causal_lm

    model_dir = tmp_path / "sharded"
    tiny_llama().save_pretrained(model_dir, max_shard_size="20KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    (model_dir / shards[0]).unlink()
    with pytest.raises(gs.ModelError) as info:
        build_causal_lm(ModelConfig(path=str(model_dir)), vocab_size=64)
    assert f"shard {shards[0]}" in str(info.value)
    assert shards[1] not in str(info.value)


def test_batch_larger_than_the_data_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(gs.DataError, match="holds 4 samples, fewer than one batch of 8"):
        gs.Trainer(MLP(), regression_data(4), base_cfg(tmp_path, batch_size=8,
                                                       drop_last=True, max_steps=1)).fit()


def test_warmup_longer_than_the_run_is_found_at_start(tmp_path: Path) -> None:
    cfg = base_cfg(tmp_path, batch_size=4, epochs=1)  # 20 samples: 5 steps
    cfg["schedule"] = {"name": "linear", "warmup_steps": 5}
    with pytest.raises(gs.ConfigError, match=r"warmup \(5 steps\) must be shorter than the run "
                       r"\(5 steps, 5 steps per epoch\)"):
        gs.Trainer(MLP(), regression_data(20), cfg).fit()


def test_epoch_interval_wants_the_warmup_in_epochs(tmp_path: Path) -> None:
    cfg = base_cfg(tmp_path, batch_size=4, epochs=3)
    cfg["schedule"] = {"name": "linear", "interval": "epoch", "warmup_steps": 2}
    with pytest.raises(gs.ConfigError, match="give the warmup as warmup_epochs or warmup_ratio"):
        gs.Trainer(MLP(), regression_data(20), cfg).fit()


def test_wandb_without_the_package_names_the_extra(tmp_path: Path) -> None:
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    cfg = base_cfg(tmp_path, batch_size=4, max_steps=1)
    cfg["logging"] = {"progress_bar": False, "tensorboard": False, "wandb": True}
    with pytest.raises(gs.ConfigError, match=r"pip install 'gearshift\[wandb\]'"):
        gs.Trainer(MLP(), regression_data(8), cfg).fit()
