"""``model.path`` naming a LoRA adapter: training continues that adapter (AdapterTransform)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

import gearshift as gs
from gearshift.models import validate_model_dir
from gearshift.transforms import AdapterTransform, build_transforms

LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


class AtStart(gs.Callback):
    """Keeps the adapter tensors and the trainable parameter names as training starts."""

    def on_train_start(self, trainer: gs.Trainer) -> None:
        model = trainer.raw_model
        self.adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        self.trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)


class Crash(RuntimeError):
    pass


class CrashAfterCheckpoint(gs.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
        if path.name == f"step-{self.step:08d}":  # committed (asynchronous saves commit later)
            raise Crash(str(trainer.run_dir))


@pytest.fixture
def saved_adapter(make_config) -> Path:
    """``final/`` of a short LoRA run on a model built from a config: an adapter directory."""
    result = gs.train(make_config(lora=LORA, training={"max_steps": 4, "eval_every": None}))
    return result.run_dir / "final"


def test_a_lora_run_exports_a_valid_self_contained_adapter(saved_adapter: Path) -> None:
    report = validate_model_dir(saved_adapter, load=True)
    assert (report.kind, report.problems) == ("adapter", [])
    assert report.base == saved_adapter / "base"  # the built base, saved beside the adapter
    assert report.tensors == 4 * 1  # q_proj and v_proj, A and B, one layer
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    assert (saved_adapter / "tokenizer.json").is_file()
    base = validate_model_dir(saved_adapter / "base", load=True)
    assert (base.kind, base.problems, base.tensors) == ("full", [], 12)


def test_training_continues_the_saved_adapter(saved_adapter: Path, make_config) -> None:
    saved = load_file(saved_adapter / "adapter_model.safetensors")
    cfg = make_config(model={"path": str(saved_adapter)},
                      training={"max_steps": 6, "eval_every": None})
    chain = build_transforms(gs.load_config(cfg))
    assert [type(t) for t in chain.transforms] == [AdapterTransform]
    start = AtStart()
    result = gs.train(cfg, callbacks=[start])
    # At start: exactly the saved LoRA weights, trainable; nothing else trainable.
    assert start.adapter.keys() == saved.keys()
    assert all(torch.equal(start.adapter[k], saved[k]) for k in saved)
    assert start.trainable and all(".lora_A." in n or ".lora_B." in n for n in start.trainable)
    assert len(start.trainable) == len(saved)
    # The result is an adapter again, on the same base, with trained (changed) weights.
    final = result.run_dir / "final"
    report = validate_model_dir(final, load=True)
    assert (report.kind, report.problems) == ("adapter", [])
    assert report.base == (saved_adapter / "base").resolve()  # the same base, not a copy
    assert not (final / "base").exists()
    trained = load_file(final / "adapter_model.safetensors")
    assert trained.keys() == saved.keys()
    changed = [k for k in saved if not torch.equal(trained[k], saved[k])]
    assert changed == sorted(saved)  # every LoRA matrix moved (B starts non-zero now)
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)  # the adapter's own rank and alpha
    # The exported adapter reproduces the trained model through plain PEFT loading.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(report.base))
    reloaded = PeftModel.from_pretrained(base, str(final))
    assert all(torch.equal(v, trained[k]) for k, v in
               get_peft_model_state_dict(reloaded).items())


def test_continued_adapter_resumes_exactly(saved_adapter: Path, make_config) -> None:
    cfg = make_config(model={"path": str(saved_adapter)}, training={"max_steps": 8})
    straight = gs.train(cfg)
    with pytest.raises(Crash) as info:
        gs.train(cfg, callbacks=[CrashAfterCheckpoint(4)])
    resumed = gs.train(cfg, resume=Path(str(info.value)))

    def losses(run: Path) -> list[tuple[int, float, float]]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").open()]
        return [(m["step"], m["loss"], m["lr"]) for m in lines if "loss" in m]

    assert losses(straight.run_dir) == losses(resumed.run_dir)
    a = load_file(straight.run_dir / "final" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_settings_that_differ_from_the_adapter_warn(saved_adapter: Path,
                                                         make_config) -> None:
    cfg = make_config(model={"path": str(saved_adapter)}, lora={**LORA, "r": 16},
                      training={"max_steps": 4, "eval_every": None},
                      checkpoint={"enabled": False})
    with pytest.warns(UserWarning, match=r"continued with its own r=4 and target_modules="):
        result = gs.train(cfg)
    assert json.loads((result.run_dir / "final" / "adapter_config.json").read_text())["r"] == 4


def test_an_adapter_whose_base_is_gone_is_a_clear_error(saved_adapter: Path,
                                                        make_config) -> None:
    config_file = saved_adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "gone"}))
    cfg = make_config(model={"path": str(saved_adapter)}, training={"max_steps": 4})
    with pytest.raises(gs.ModelError) as info:
        gs.train(cfg)
    assert str(info.value) == (
        f"model directory {saved_adapter} is not valid (1 problem):\n"
        f"  - base model gone ({saved_adapter / 'gone'}): the directory does not exist; check "
        "the path")
