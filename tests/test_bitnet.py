"""BitNet b1.58 quantization-aware training: the arithmetic, the transform, the ramp, the
packed export that plain transformers loads, and QAT runs (with LoRA, resumed, in bf16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.bitnet import pack_weights, unpack_weights

import gearshift as gs
from gearshift import rundir
from gearshift.config.schema import QuantizationConfig
from gearshift.errors import ConfigError
from gearshift.transforms import BitNetTransform, build_transforms
from gearshift.transforms.bitnet import ramp_lambda, select_linears, ternary_layers
from gearshift.transforms.bitnet_export import export_packed
from gearshift.transforms.ternary import TernaryLinear, quantize_activations, ternary_weight

QAT = {"method": "bitnet_b158"}


def tiny_llama(intermediate: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def quantized(model: nn.Module, **section: object) -> nn.Module:
    return BitNetTransform(QuantizationConfig(**{**QAT, **section}), say=lambda _: None
                           ).apply(model)


def test_ternary_values_are_exactly_minus_one_zero_one_times_the_absmean_scale() -> None:
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.3
    t, inv = ternary_weight(w)
    assert set(t.unique().tolist()) == {-1.0, 0.0, 1.0}
    scale = w.abs().mean()
    torch.testing.assert_close(1.0 / inv, scale.reshape(1))
    expected = (w / scale).round().clamp(-1, 1)
    assert torch.equal(t, expected)
    layer = TernaryLinear.from_linear(nn.Linear(40, 24, bias=False))
    with torch.no_grad():
        layer.weight.copy_(w)
    # The weight the forward pass uses takes three values only: {-1, 0, 1} · mean|W|.
    used = F.linear(torch.eye(40), t / inv).T
    assert set(torch.round(used / scale, decimals=5).unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_activations_are_per_token_absmax_8_bit() -> None:
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    xi, a = quantize_activations(x)
    assert xi.abs().max() <= 127 and torch.equal(xi, xi.round())
    assert torch.equal(xi.abs().amax(-1), torch.full((3, 5), 127.0))  # every token uses the range
    torch.testing.assert_close(xi / a, x, atol=x.abs().amax(-1, keepdim=True).max() / 127, rtol=0)


def detach_trick(layer: TernaryLinear, x: torch.Tensor) -> torch.Tensor:
    """The textbook straight-through estimator, written out."""
    t, inv = ternary_weight(layer.weight)
    w = layer.weight + (t / inv - layer.weight).detach()
    xi, a = quantize_activations(x)
    xq = x + (xi / a - x).detach()
    return F.linear(xq, w, layer.bias)


def test_ste_gradient_equals_the_detach_trick() -> None:
    torch.manual_seed(2)
    layer = TernaryLinear.from_linear(nn.Linear(16, 8))
    x = torch.randn(4, 6, 16, requires_grad=True)
    target = torch.randn(4, 6, 8)
    ((layer(x) - target) ** 2).sum().backward()
    got = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad = None
    layer.zero_grad()
    ((detach_trick(layer, x) - target) ** 2).sum().backward()
    for a, b in zip(got, (x.grad, layer.weight.grad, layer.bias.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(4, 3), (8, 1), (12, 7), (64, 32), (4,), (16,), (128, 5, 2)])
def test_pack_then_unpack_is_the_identity(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    t = torch.randint(-1, 2, shape, generator=g).float()
    original = t.clone()
    packed = pack_weights(t.clone())
    assert packed.dtype == torch.uint8 and packed.shape[0] == shape[0] // 4
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), original)
    pack_weights(t)
    assert not torch.equal(t, original)  # the pitfall: it shifts its argument in place


def test_lambda_zero_is_the_unquantized_model_and_one_quantizes() -> None:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    plain = tiny_llama().eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    model = quantized(tiny_llama()).eval()
    for _, layer in ternary_layers(model):
        layer.quant_lambda = 0.0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
        for _, layer in ternary_layers(model):
            layer.quant_lambda = 1.0
        assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-3)


def test_default_modules_every_linear_but_lm_head_and_exclude() -> None:
    names, unpackable = select_linears(tiny_llama(), QuantizationConfig(**QAT))
    assert len(names) == 14 and not unpackable and "lm_head" not in names
    names, _ = select_linears(tiny_llama(), QuantizationConfig(**QAT, exclude=["o_proj", ".*mlp.*"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["k_proj", "q_proj", "v_proj"]
    names, _ = select_linears(tiny_llama(), QuantizationConfig(**QAT, modules=["down_proj"]))
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_a_layer_that_cannot_be_packed_is_reported_not_silently_skipped() -> None:
    said: list[str] = []
    model = BitNetTransform(QuantizationConfig(**QAT), say=said.append).apply(tiny_llama(30))
    unpackable = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                  "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    line = next(s for s in said if "full precision" in s)
    assert all(name in line for name in unpackable) and "multiple of 4" in line
    for name in unpackable:
        assert type(model.get_submodule(name)) is nn.Linear
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), TernaryLinear)


def test_the_ramp_is_the_closed_form() -> None:
    assert [ramp_lambda(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [ramp_lambda(s, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    cosine = [ramp_lambda(s, 4, "warmup_cosine") for s in range(4)]
    assert cosine[1] == pytest.approx(0.5) and cosine[-1] == 1.0


def test_bad_quantization_config_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        gs.load_config({"quantization": {"method": "bitnet", "activation_bits": 9,
                                         "exclude": ["("], "ramp": {"shape": "constant"}},
                        "phases": {"phases": [{"name": "a", "quant_lambda": 2}]}})
    text = str(err.value)
    for key in ("quantization.method", "quantization.activation_bits", "quantization.exclude",
                "quantization.ramp.shape", "quant_lambda"):
        assert key in text
    with pytest.raises(ConfigError, match="quantization.method is null"):
        gs.load_config({"phases": {"phases": [{"name": "a", "quant_lambda": 0.5}]}})
    with pytest.raises(ConfigError, match="quantization.modules"):
        quantized(tiny_llama(), modules=["no_such_layer"])


def test_build_transforms_puts_the_quantized_base_below_lora() -> None:
    cfg = gs.load_config({"quantization": QAT, "lora": {"enabled": True}})
    assert build_transforms(cfg).names == ["bitnet", "lora"]
    assert build_transforms(gs.load_config({"quantization": QAT})).strict


@pytest.fixture(scope="module")
def packed_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = quantized(tiny_llama(), exclude=["layers.1.self_attn.o_proj"]).eval()
    out = tmp_path_factory.mktemp("export") / "packed"
    report = export_packed(model, out)
    assert report.layers == 13
    return model, out


def test_packed_export_loads_with_plain_transformers(packed_export) -> None:
    from transformers.integrations.bitnet import BitLinear

    model, out = packed_export
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["linear_class"], q["quantization_mode"]) == (
        "bitnet", "bitlinear", "offline")
    assert sorted(q["modules_to_not_convert"]) == ["lm_head", "model.layers.1.self_attn.o_proj"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert w.dtype == torch.uint8 and tuple(w.shape) == (16, 32)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").shape == (1,)
        assert f.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert isinstance(loaded.model.layers[0].mlp.up_proj, BitLinear)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5
    prompt = ids[:1, :4]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **kwargs), loaded.generate(prompt, **kwargs))


# ---------------------------------------------------------------------------- QAT runs


def metric_rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return rundir.metric_series(rundir.read_metrics(run_dir), key)


def test_qat_run_logs_the_ramp_and_quant_statistics_and_exports_packed(make_config) -> None:
    cfg = make_config(quantization={**QAT, "ramp": {"steps": 4}},
                      training={"max_steps": 8, "eval_every": 4})
    result = gs.train(cfg)
    run = result.run_dir
    assert metric_rows(run, "quant/lambda") == [
        (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0), (5, 1.0), (6, 1.0), (7, 1.0), (8, 1.0)]
    evals = [m for m in rundir.read_metrics(run) if "eval/loss" in m.values]
    assert [m.step for m in evals] == [0, 4, 8]
    for m in evals:
        assert 0.0 < m.values["quant/zero_fraction"] < 1.0 and m.values["quant/scale"] > 0
        assert {"quant/zero_fraction/q_proj", "quant/zero_fraction/down_proj"} <= set(m.values)
    state = json.loads((rundir.latest_checkpoint(run).path / "trainer_state.json").read_text())
    assert state["transforms"]["bitnet"]["lambda"] == 1.0
    final = run / "final"
    assert json.loads((final / "config.json").read_text())["quantization_config"][
        "quant_method"] == "bitnet"
    assert (final / "tokenizer_config.json").is_file() or (final / "tokenizer.json").is_file()


def test_a_phase_sets_lambda_instead_of_the_ramp(make_config) -> None:
    phases = {"window": 3, "phases": [
        {"name": "settle", "quant_lambda": 0.0, "min_steps": 0, "max_steps": 3},
        {"name": "ternary", "quant_lambda": 1.0}]}
    cfg = make_config(quantization={**QAT, "ramp": {"steps": 100}}, phases=phases,
                      training={"max_steps": 5, "eval_every": None})
    run = gs.train(cfg).run_dir
    assert [v for _, v in metric_rows(run, "quant/lambda")] == [0.0, 0.0, 0.0, 1.0, 1.0]


class Crash(RuntimeError):
    pass


class CrashAfterCheckpoint(gs.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
        if path.name == f"step-{self.step:08d}":  # committed (asynchronous saves commit later)
            raise Crash(str(trainer.run_dir))


def test_qat_crash_and_resume_is_bit_identical(make_config) -> None:
    cfg = make_config(quantization={**QAT, "ramp": {"steps": 6}},
                      training={"max_steps": 10, "eval_every": 5}, checkpoint={"every": 3})
    straight = gs.train({**cfg, "name": "straight"}).run_dir
    with pytest.raises(Crash) as info:
        gs.train({**cfg, "name": "crashed"}, callbacks=[CrashAfterCheckpoint(3)])  # mid-ramp
    crashed = Path(str(info.value))
    gs.train({**cfg, "name": "crashed"}, resume=crashed)
    for key in ("loss", "lr", "grad_norm", "quant/lambda", "eval/loss", "quant/scale"):
        assert metric_rows(straight, key) == metric_rows(crashed, key), key
    from safetensors.torch import load_file

    for sub in ("final", "checkpoints/step-00000010"):
        a = load_file(straight / sub / "model.safetensors")
        b = load_file(crashed / sub / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_qat_with_lora_trains_only_the_adapters_on_a_ternary_base(make_config) -> None:
    cfg = make_config(quantization=QAT, training={"max_steps": 4, "eval_every": None},
                      lora={"enabled": True, "r": 4, "alpha": 8,
                            "target_modules": ["q_proj", "v_proj"]})
    task = gs.tasks.TASKS["lm"](gs.load_config(cfg))
    parts = task.build()
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    trainer = gs.Trainer(parts.model, parts.train_data, cfg, eval_data=parts.eval_data,
                         task=task, tokenizer=parts.tokenizer)
    trainer.fit()
    model = trainer.raw_model
    layers = ternary_layers(model)
    assert len(layers) == 7 and all(layer.quant_lambda == 1.0 for _, layer in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, layer in layers:  # the ternary base did not move
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(layer.weight, before[plain + ".weight"])
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj.base_layer, TernaryLinear)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    kept = trainer.transforms.checkpoint_weights(model)
    assert set(kept) == trainable


def test_qat_runs_under_bf16_autocast(make_config) -> None:
    cfg = make_config(quantization={**QAT, "ramp": {"steps": 2}},
                      training={"max_steps": 4, "eval_every": None, "precision": "bf16"})
    result = gs.train(cfg)
    losses = [v for _, v in metric_rows(result.run_dir, "loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert metric_rows(result.run_dir, "quant/lambda")[-1] == (4, 1.0)


# ---------------------------------------------------------------------------- gearshift quantize


def test_quantize_export_of_a_model_dir_packs_it_and_reports_sizes(tmp_path: Path, cli) -> None:
    src = tmp_path / "fp"
    tiny_llama().save_pretrained(str(src))
    code, out, err = cli("quantize", "export", str(src), str(tmp_path / "packed"),
                         "--exclude", "o_proj", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["layers"] == 12
    # Packed ternary layers: 2 bits instead of 16 per weight, plus one scale each.
    assert 7.5 < report["quantized_fp16_bytes"] / report["quantized_bytes"] <= 8
    assert report["total_bytes"] < report["fp16_bytes"]
    q = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert sorted(q["modules_to_not_convert"]) == [
        "lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    from gearshift.models import validate_model_dir

    validate_model_dir(tmp_path / "packed")
    code, out, err = cli("quantize", "export", str(tmp_path / "packed"), str(tmp_path / "again"))
    assert code == 0 and "ternary layers" in out  # an export is copied as it is


def test_quantize_export_of_a_stopped_qat_run_uses_its_newest_checkpoint(
        make_config, cli, tmp_path: Path) -> None:
    cfg = make_config(quantization=QAT, training={"max_steps": 6, "eval_every": None},
                      checkpoint={"every": 2})
    with pytest.raises(Crash) as info:
        gs.train(cfg, callbacks=[CrashAfterCheckpoint(4)])
    run = Path(str(info.value))
    code, out, err = cli("quantize", "export", str(run), str(tmp_path / "packed"))
    assert code == 0, err
    assert "ternary layers" in out and (tmp_path / "packed" / "tokenizer_config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "packed" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.uint8


def test_quantize_export_bad_input_is_a_clear_error(tmp_path: Path, cli) -> None:
    code, _, err = cli("quantize", "export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2 and "is not a directory" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("quantize", "export", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert code == 2 and "neither a model directory" in err
    code, _, err = cli("quantize", "export", str(tmp_path), str(tmp_path / "empty"))
    assert code == 2 and "already exists" in err
    code, out, _ = cli("quantize", "export", "--help")
    assert code == 0 and "modules_to_not_convert" in out


def test_validate_model_dir_accepts_a_packed_export_and_names_a_broken_entry(
        packed_export, tmp_path: Path) -> None:
    from gearshift.data import load_tokenizer
    from gearshift.errors import ModelError
    from gearshift.models import is_packed_bitnet, quantization_config_of, validate_model_dir

    _, export = packed_export
    out = tmp_path / "with-tokenizer"  # what a run's final/ holds: the export and its tokenizer
    shutil.copytree(export, out)
    load_tokenizer("byte", None).save_pretrained(out)
    report = validate_model_dir(out)
    assert report.ok and report.kind == "full", report.problems
    assert is_packed_bitnet(out) and quantization_config_of(out)["linear_class"] == "bitlinear"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (broken / "config.json").write_text(json.dumps({"quantization_config": "bitnet"}))
    report = validate_model_dir(broken)
    assert not report.ok and any("quantization_config must be an object" in p
                                 for p in report.problems), report.problems
    with pytest.raises(ModelError, match="quantization_config must be an object"):
        quantization_config_of(broken)


@pytest.mark.slow
def test_qat_sigkill_then_resume_is_bit_identical(make_config, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    cfg = make_config(quantization={**QAT, "ramp": {"steps": 10}},
                      training={"max_steps": 16, "eval_every": 8}, checkpoint={"every": 3})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "gearshift", *args], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def config_file(name: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "name": name}), encoding="utf-8")
        return str(path)

    straight = start("train", config_file("straight"))
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    victim = start("train", config_file("victim"))
    deadline = time.time() + 600
    while not list((tmp_path / "runs").glob("victim-*/checkpoints/step-00000006/manifest.json")):
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read()
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # mid-ramp: λ was 0.6 at step 6
    assert victim.wait(timeout=60) == -signal.SIGKILL
    (run,) = (tmp_path / "runs").glob("victim-*")
    resumed = start("resume", str(run))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    (straight_dir,) = (tmp_path / "runs").glob("straight-*")
    for key in ("loss", "lr", "grad_norm", "quant/lambda", "eval/loss", "quant/zero_fraction"):
        assert metric_rows(straight_dir, key) == metric_rows(run, key), key
    from safetensors.torch import load_file

    for sub in ("final", "checkpoints/step-00000016"):
        a, b = (load_file(d / sub / "model.safetensors") for d in (straight_dir, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
