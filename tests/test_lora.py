"""gearshift.lora: attaching LoRA with PEFT, groups, phase alphas, exported adapters."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from gearshift.errors import ConfigError, ModelError
from gearshift.lora import (
    apply_phase_alpha,
    attach_lora,
    export_adapter,
    lora_groups,
    lora_layers,
)


class GroupAlphas:
    """A stand-in phase controller: alphas by group, PEFT's scale convention."""

    def __init__(self, alphas: dict[str, float], *, rslora: bool = False, patterns=None):
        self.alphas = alphas
        self.rslora = rslora
        self.patterns = patterns or {}

    def group(self, name: str, is_conv: bool) -> str:
        for group, pattern in self.patterns.items():
            if re.search(pattern, name):
                return group
        return "conv" if is_conv else "linear"

    def get_alpha(self, module_name, is_conv=False, expert=None) -> float:
        return self.alphas[expert or self.group(module_name, is_conv)]

    def get_scale(self, module_name, rank, is_conv=False, expert=None) -> float:
        alpha = self.get_alpha(module_name, is_conv, expert)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _train(model, batches, loss_of, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(steps):
        loss_of(model, batches[step % len(batches)]).backward()
        opt.step()
        opt.zero_grad()


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


ATTN = {"attn": r"\.self_attn\."}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_exported_llama_adapter_reloads_with_the_alphas_in_force(tmp_path: Path, rslora: bool):
    base = tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach_lora(
        base, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], groups=ATTN,
        use_rslora=rslora,
    )
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    _train(model, [ids], _lm_loss)
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for _, layer, *_ in lora_layers(model))
    in_force = apply_phase_alpha(model, GroupAlphas({"attn": 3.0, "linear": 20.0}, rslora=rslora,
                                                    patterns=ATTN))
    assert in_force == {"attn": 3.0, "linear": 20.0}
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    out = export_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora
    assert config["lora_alpha"] == 3.0 and config["alpha_pattern"] == {"down_proj": 20.0}

    fresh = tiny_llama()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-5
    for (name, layer, *_), (name2, layer2, *_) in zip(
        lora_layers(model), lora_layers(loaded), strict=True
    ):
        assert name == name2 and layer.scaling == pytest.approx(layer2.scaling)


def test_exported_conv_adapter_reloads_with_the_alphas_in_force(tmp_path: Path):
    base = ConvNet()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach_lora(base, r=2, alpha=4, target_modules=["conv", "head"])
    assert lora_groups(model) == {"conv": ["conv"], "linear": ["head"]}
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    _train(model, [x], lambda m, b: m(b).pow(2).mean(), steps=3)
    assert apply_phase_alpha(model, GroupAlphas({"conv": 7.0, "linear": 0.5})) == {
        "conv": 7.0, "linear": 0.5,
    }
    model.eval()
    with torch.no_grad():
        expected = model(x)
    out = export_adapter(model, tmp_path / "conv-adapter")
    fresh = ConvNet()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max().item() < 1e-5


def test_apply_phase_alpha_scales_the_lora_delta_exactly():
    model = attach_lora(ConvNet(), r=2, alpha=4, target_modules=["head"])
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    _train(model, [x], lambda m, b: m(b).pow(2).mean())
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base_out = model(x)
    deltas = {}
    for alpha in (4.0, 1.0, 12.0):
        apply_phase_alpha(model, GroupAlphas({"linear": alpha}))
        layer = model.base_model.model.head
        assert layer.scaling["default"] == alpha / 2 and layer.lora_alpha["default"] == alpha
        assert model.peft_config["default"].lora_alpha == alpha
        with torch.no_grad():
            deltas[alpha] = model(x) - base_out
    assert deltas[4.0].abs().max() > 0
    torch.testing.assert_close(deltas[1.0], deltas[4.0] / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deltas[12.0], deltas[4.0] * 3, rtol=1e-5, atol=1e-6)


def test_conv1d_conv3d_targets_and_type_groups():
    net = nn.ModuleDict({
        "c1": nn.Conv1d(2, 3, 3), "c3": nn.Conv3d(2, 2, 1), "fc": nn.Linear(3, 3),
        "emb": nn.Embedding(10, 4),
    })
    model = attach_lora(net, r=1, alpha=2, target_modules=["c1", "c3", "fc", "emb"])
    assert {name: (is_conv, group) for name, _, is_conv, group in lora_layers(model)} == {
        "c1": (True, "conv"), "c3": (True, "conv"), "fc": (False, "linear"),
        "emb": (False, "embedding"),
    }


def test_regex_groups_with_type_fallback():
    groups = {"attn": r"\.self_attn\.", "up": r"up_proj$"}
    model = attach_lora(
        tiny_llama(), r=2, alpha=2, target_modules=["q_proj", "up_proj", "down_proj"],
        groups=groups,
    )
    found = lora_groups(model)
    assert found["attn"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert found["up"] == [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    assert found["linear"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    # Another grouping can be asked for without re-attaching.
    assert set(lora_groups(model, None)) == {"linear"}


def test_per_module_and_per_expert_alphas_round_trip(tmp_path: Path):
    """Alphas that differ within a short name need anchored full names in alpha_pattern."""
    base = tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach_lora(base, r=2, alpha=2, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    _train(model, [ids], _lm_loss)
    layer_of = {"model.layers.0.self_attn.q_proj": "e0"}
    alphas = apply_phase_alpha(
        model, GroupAlphas({"linear": 2.0, "e0": 9.0}), expert_of=layer_of.get
    )
    assert alphas == {"linear": 2.0, "linear/e0": 9.0}
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = export_adapter(model, tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 2.0
    assert config["alpha_pattern"] == {r"^model\.layers\.0\.self_attn\.q_proj": 9.0}
    fresh = tiny_llama()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - expected).abs().max().item() < 1e-5


def test_controller_rslora_mismatch_warns_and_the_scale_wins():
    model = attach_lora(ConvNet(), r=4, alpha=4, target_modules=["head"])
    with pytest.warns(UserWarning, match="use_rslora agree"):
        apply_phase_alpha(model, GroupAlphas({"linear": 6.0}, rslora=True))
    layer = model.base_model.model.head
    assert layer.scaling["default"] == pytest.approx(6.0 / 2)
    assert layer.lora_alpha["default"] == pytest.approx(12.0)  # alpha / r == scale


def test_config_errors_name_the_key_and_list_real_modules():
    with pytest.raises(ConfigError) as err:
        attach_lora(tiny_llama(), r=2, alpha=4, target_modules=["query", "value"])
    text = str(err.value)
    assert "lora.target_modules" in text and "q_proj" in text and "down_proj" in text

    with pytest.raises(ConfigError) as err:
        attach_lora(ConvNet(), r=0, alpha=-1, target_modules=[], groups={"bad": "("})
    paths = [p.path for p in err.value.problems]
    assert paths == ["lora.r", "lora.alpha", "lora.target_modules", "lora.groups.bad"]

    with pytest.raises(ConfigError, match="lora.groups.mlp"):
        attach_lora(tiny_llama(), r=2, alpha=4, target_modules=["q_proj"],
                    groups={"mlp": r"\.mlp\."})
    with pytest.raises(ConfigError, match="hold other layers"):
        attach_lora(tiny_llama(), r=2, alpha=4, target_modules=r".*\.self_attn")
    with pytest.raises(ConfigError, match="PEFT cannot attach"):
        attach_lora(tiny_llama(), r=2, alpha=4, target_modules=["input_layernorm"])


def test_merged_layers_refuse_new_alphas(tmp_path: Path):
    model = attach_lora(ConvNet(), r=2, alpha=4, target_modules=["head"])
    model.merge_adapter()
    with pytest.raises(ModelError, match="unmerge"):
        apply_phase_alpha(model, GroupAlphas({"linear": 1.0}))
    with pytest.raises(ModelError, match="PEFT model"):
        export_adapter(model.base_model.model, tmp_path)
