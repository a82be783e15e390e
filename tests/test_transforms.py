"""Model transforms: LoRA as the first one, and chains applied in their declared order."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import gearshift as gs
from gearshift.config.schema import LoraConfig
from gearshift.tasks import CausalLMLoss
from gearshift.transforms import LoraTransform, Transform, TransformChain, build_transforms

PHASES = {"window": 4, "phases": [
    {"name": "low", "alpha": 4, "min_steps": 3, "max_steps": 4},
    {"name": "high", "alpha": 24}]}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=32))


def lm_data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (12,), generator=g)} for _ in range(n)]


def trained_lora(tmp_path: Path) -> gs.Trainer:
    cfg = {"output_dir": str(tmp_path / "runs"), "seed": 3, "optim": {"learning_rate": 1e-2},
           "schedule": {"name": "constant"},
           "training": {"max_steps": 10, "batch_size": 4, "eval_every": None, "log_every": 1},
           "checkpoint": {"every": 5}, "logging": {"progress_bar": False, "tensorboard": False},
           "lora": {"enabled": True, "r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
           "phases": PHASES}
    trainer = gs.Trainer(tiny_llama(), lm_data(32), cfg, loss_fn=CausalLMLoss())
    trainer.fit()
    return trainer


def test_lora_checkpoints_adapters_only_and_exports_merged_or_adapter(tmp_path: Path) -> None:
    trainer = trained_lora(tmp_path)
    chain = trainer.transforms
    assert chain.names == ["lora"] and not chain.strict
    model = trainer.raw_model
    kept = chain.checkpoint_weights(model)
    assert isinstance(kept, dict) and kept and all("lora_" in name for name in kept)
    assert set(kept) == {n for n, p in model.named_parameters() if p.requires_grad}
    # The default export: a PEFT adapter with the alpha in force at the end (phase "high").
    adapter = json.loads((trainer.run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 24
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = chain.export(model, tmp_path / "merged", merged=True)
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(merged), local_files_only=True)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())  # a plain model
    with torch.no_grad():
        got = loaded.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # exporting merged left the trained model (adapters and all) as it was
        assert torch.equal(model(input_ids=ids).logits, expected)


class Record(Transform):
    """Wraps the model in a named container and keeps only tensors whose name has its tag."""

    strict = False

    def __init__(self, tag: str, log: list[str]) -> None:
        self.name = tag
        self.tag, self.log = tag, log

    def apply(self, model: nn.Module) -> nn.Module:
        self.log.append(f"apply {self.tag}")
        wrapper = nn.ModuleDict({"inner": model, self.tag: nn.Linear(1, 1)})
        return wrapper

    def checkpoint_tensors(self, model: nn.Module, names: set[str]) -> set[str]:
        return {n for n in names if self.tag in n or "keep" in n}

    def merge(self, model: nn.Module) -> nn.Module:
        self.log.append(f"merge {self.tag}")
        return model["inner"]


def test_transforms_compose_in_their_declared_order(tmp_path: Path) -> None:
    log: list[str] = []
    chain = TransformChain([Record("first", log), Record("second", log)])
    model = chain.apply(nn.Linear(2, 2))
    assert log == ["apply first", "apply second"]
    assert list(model) == ["inner", "second"] and list(model["inner"]) == ["inner", "first"]
    # Each transform narrows what the checkpoint holds; both must agree to keep a tensor.
    assert set(chain.checkpoint_weights(model)) == set()
    chain.export(model, tmp_path / "out", merged=True)
    assert log[2:] == ["merge second", "merge first"]  # folded back in reverse order
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_build_transforms_reads_the_config() -> None:
    assert build_transforms(gs.load_config({})).names == []
    chain = build_transforms(gs.load_config({"lora": {"enabled": True, "r": 2}}))
    assert chain.names == ["lora"]
    assert isinstance(chain.transforms[0], LoraTransform)
    assert LoraTransform(LoraConfig(enabled=True)).strict is False


