"""Phases inside the trainer: LoRA alphas, LR scale, events, checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gearshift as gs
from gearshift.checkpoint import step_dir_name

PHASES = {
    "window": 5,
    "phases": [
        {"name": "foundation", "alpha": 8, "min_steps": 5, "max_steps": 10},
        {"name": "balance", "alpha": 16, "min_steps": 5, "max_steps": 10, "lr_scale": 0.5},
        {"name": "emphasis", "alpha": 32},
    ],
}
LORA = {"enabled": True, "r": 4, "alpha": 8}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


def phase_config(make_config, **extra) -> dict:
    return make_config(training={"max_steps": 24}, lora=LORA, phases=PHASES,
                       checkpoint={"every": 4}, **extra)


class Crash(RuntimeError):
    pass


class CrashAt(gs.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
        if path.name == step_dir_name(self.step):  # committed (later, with checkpoint.async)
            raise Crash(str(trainer.run_dir))


def test_transitions_set_alphas_lr_scale_and_are_logged(make_config) -> None:
    result = gs.train(phase_config(make_config))
    events = [e for e in lines(result.run_dir / "events.jsonl") if e["event"] == "phase_transition"]
    assert [(e["step"], e["from_phase"], e["to_phase"], e["reason"]) for e in events] == [
        (10, "foundation", "balance", "max_steps"), (20, "balance", "emphasis", "max_steps")]
    assert [(e["from_alpha"], e["to_alpha"]) for e in events] == [(8.0, 16.0), (16.0, 32.0)]
    assert events[0]["alphas"] == {"linear": 16.0}
    train = [m for m in lines(result.run_dir / "metrics.jsonl") if "loss" in m]
    by_step = {m["step"]: m for m in train}
    assert by_step[9]["phase"] == "foundation" and by_step[9]["alpha/linear"] == 8.0
    assert by_step[11]["phase"] == "balance" and by_step[11]["alpha/linear"] == 16.0
    assert by_step[21]["phase/index"] == 2
    assert all(0.0 <= m["grad_stability"] <= 1.0 for m in train if "grad_stability" in m)
    # lr_scale 0.5 in "balance": the logged LR is half the closed-form schedule.
    from gearshift.schedules import lr_multiplier

    peak = 3e-3
    for step in (12, 15, 19):
        expected = peak * lr_multiplier("warmup_cosine", step - 1, total_steps=24,
                                        warmup_steps=3, min_lr_ratio=0.1) * 0.5
        assert by_step[step]["lr"] == pytest.approx(expected, rel=1e-12)
    # The exported adapter carries the alpha in force at the end, not the starting one.
    cfg = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 32


def test_exported_adapter_reproduces_the_trained_model(make_config) -> None:
    from peft import PeftModel

    from gearshift.data import byte_level_tokenizer
    from gearshift.tasks import build_causal_lm

    cfg = gs.load_config(phase_config(make_config))
    result = gs.train(cfg)
    tok = byte_level_tokenizer()

    def base() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return build_causal_lm(cfg.model, vocab_size=len(tok), eos_token_id=tok.eos_token_id)

    # The trained model: base + adapter weights from the last checkpoint, alphas of its phase.
    from gearshift.lora import apply_phase_alpha, attach_lora
    from gearshift.phases import build_phase_scheduler

    trained = attach_lora(base(), r=4, alpha=8, target_modules=cfg.lora.target_modules)
    ckpt = load_file(result.run_dir / "checkpoints" / "latest" / "model.safetensors")
    missing = trained.load_state_dict(ckpt, strict=False)
    assert not missing.unexpected_keys
    controller = build_phase_scheduler(cfg.phases, rank=4)
    state = json.loads((result.run_dir / "checkpoints" / "latest" / "trainer_state.json")
                       .read_text())
    controller.load_state_dict(state["phases"])
    apply_phase_alpha(trained, controller)
    loaded = PeftModel.from_pretrained(base(), result.run_dir / "final")
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        diff = (trained(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("crash_step", [8, 12])
def test_resume_mid_phase_is_bit_identical(make_config, crash_step: int) -> None:
    cfg = phase_config(make_config)
    # Crash at the checkpoint's own step: events are not rewound by a resume, and a background
    # save would be announced a few steps later, after the transition this test counts.
    cfg["checkpoint"]["async"] = False
    straight = gs.train(cfg)
    with pytest.raises(Crash) as info:
        gs.train(cfg, callbacks=[CrashAt(crash_step)])
    run_dir = Path(str(info.value))
    state = json.loads((run_dir / "checkpoints" / f"step-{crash_step:08d}" /
                        "trainer_state.json").read_text())
    assert state["phases"]["phase_index"] == (0 if crash_step < 10 else 1)
    resumed = gs.train(cfg, resume=run_dir)

    def train_lines(run: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "memory/peak_mb")}
                for m in lines(run / "metrics.jsonl") if "loss" in m]

    assert train_lines(straight.run_dir) == train_lines(resumed.run_dir)
    a = load_file(straight.run_dir / "final" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    transitions = [e["step"] for e in lines(resumed.run_dir / "events.jsonl")
                   if e["event"] == "phase_transition"]
    assert transitions == [10, 20]  # each logged once, before or after the crash


def test_checkpoint_without_phases_starts_at_phase_zero(make_config) -> None:
    plain = make_config(training={"max_steps": 24}, lora=LORA, checkpoint={"every": 4})
    with pytest.raises(Crash) as info:
        gs.train(plain, callbacks=[CrashAt(12)])
    run_dir = Path(str(info.value))
    ckpt = run_dir / "checkpoints" / "step-00000012"
    assert "phases" not in json.loads((ckpt / "trainer_state.json").read_text())
    assert not (ckpt / "grad_signs.safetensors").exists()  # phases off: nothing saved for them
    with pytest.warns(UserWarning, match="before phases were enabled"):
        resumed = gs.train(phase_config(make_config), resume=run_dir)
    events = [e for e in lines(resumed.run_dir / "events.jsonl")
              if e["event"] == "phase_transition"]
    # Phase 0 starts at the resume step 12, so its max_steps of 10 ends it at step 22.
    assert [(e["step"], e["to_phase"]) for e in events] == [(22, "balance")]


def test_phases_disabled_behave_exactly_as_without(make_config) -> None:
    off = gs.train(make_config(training={"max_steps": 8}, lora=LORA,
                               phases={**PHASES, "enabled": False}))
    none = gs.train(make_config(training={"max_steps": 8}, lora=LORA))
    assert [m["loss"] for m in lines(off.run_dir / "metrics.jsonl") if "loss" in m] == \
        [m["loss"] for m in lines(none.run_dir / "metrics.jsonl") if "loss" in m]
    assert not any("phase" in m for m in lines(off.run_dir / "metrics.jsonl"))


def test_bad_phases_config_reports_every_problem(make_config) -> None:
    bad = make_config(phases={"window": 0, "phases": [{"name": "a", "min_step": 5}]})
    with pytest.raises(gs.ConfigError) as info:
        gs.load_config(bad)
    paths = {p.path for p in info.value.problems}
    assert "phases.phases.0.min_step" in paths
    assert "phases.window" in paths


def test_group_alphas_follow_lora_groups(make_config) -> None:
    phases = {"window": 5, "phases": [
        {"name": "foundation", "alpha": {"attn": 8, "mlp": 4}, "min_steps": 2, "max_steps": 4},
        {"name": "emphasis", "alpha": {"attn": 32, "mlp": 16}}]}
    lora = {**LORA, "groups": {"attn": "self_attn", "mlp": "mlp"}}
    result = gs.train(make_config(training={"max_steps": 6}, lora=lora, phases=phases))
    train = {m["step"]: m for m in lines(result.run_dir / "metrics.jsonl") if "loss" in m}
    assert (train[2]["alpha/attn"], train[2]["alpha/mlp"]) == (8.0, 4.0)
    assert (train[5]["alpha/attn"], train[5]["alpha/mlp"]) == (32.0, 16.0)
    cfg = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    alphas = {**{k: cfg["lora_alpha"] for k in ("q_proj", "gate_proj")}, **cfg["alpha_pattern"]}
    assert alphas["q_proj"] == 32 and alphas["gate_proj"] == 16


def test_a_step_lost_to_nan_or_oom_is_not_counted_by_the_controller(make_config) -> None:
    holder: dict = {}

    class Keep(gs.Callback):
        def on_train_start(self, trainer: gs.Trainer) -> None:
            holder["trainer"] = trainer

    cfg = make_config(training={"max_steps": 12, "batch_size": 8}, lora=LORA, phases=PHASES,
                      faults={"nan_at_steps": [5], "oom_when_batch_above": 4})
    gs.train(cfg, callbacks=[Keep()])
    controller = holder["trainer"].dynamics.controller
    assert controller.total_steps == 12  # 12 optimizer steps; the NaN attempt is not one
    assert controller.last_step == 12
    events = [e["event"] for e in lines(holder["trainer"].run_dir / "events.jsonl")]
    assert events.count("nonfinite_skip") == 1 and events.count("oom_recovery") == 1
