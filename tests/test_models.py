"""Model directories: ``validate_model_dir`` and ``gearshift model validate``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gearshift.errors import ModelError
from gearshift.models import (
    ModelDirReport,
    adapter_base,
    load_base_model,
    require_model_dir,
    tokenizer_dir,
    validate_model_dir,
)

NO_TOKENIZER = ("no tokenizer: expected tokenizer.json or tokenizer_config.json (save one with "
                "tokenizer.save_pretrained(DIR))")
NO_WEIGHTS = ("no weights: expected model.safetensors, pytorch_model.bin or a sharded index "
              "(model.safetensors.index.json) with its shards")
INDEX = "model.safetensors.index.json"


def _llama(tie: bool = False):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=tie))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of model directory as transformers and PEFT save them (no download)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gearshift.data import byte_level_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = byte_level_tokenizer()
    model = _llama()
    out = {name: root / name for name in ("full", "sharded", "tied", "bin", "adapter")}
    model.save_pretrained(str(out["full"]), safe_serialization=True)
    model.save_pretrained(str(out["sharded"]), safe_serialization=True, max_shard_size="8KB")
    _llama(tie=True).save_pretrained(str(out["tied"]), safe_serialization=True)
    out["bin"].mkdir()
    shutil.copy(out["full"] / "config.json", out["bin"])
    torch.save(model.state_dict(), out["bin"] / "pytorch_model.bin")  # a legacy weights file
    for name in ("full", "sharded", "tied", "bin"):
        tok.save_pretrained(str(out[name]))
    base = AutoModelForCausalLM.from_pretrained(str(out["full"]))
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj",
                                                                             "v_proj"]))
    peft.save_pretrained(str(out["adapter"]), safe_serialization=True)
    _set_base(out["adapter"], "../full")  # relative: to the adapter directory
    return out


def _set_base(adapter: Path, base: str | None) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model-*.safetensors"))


@pytest.mark.parametrize("load", [False, True])
def test_every_kind_is_recognised(dirs: dict[str, Path], load: bool) -> None:
    assert len(_shards(dirs["sharded"])) >= 3
    kinds = {name: validate_model_dir(d, load=load) for name, d in dirs.items()}
    assert {n: (r.kind, r.ok, r.problems) for n, r in kinds.items()} == {
        "full": ("full", True, []), "sharded": ("sharded", True, []),
        "tied": ("full", True, []), "bin": ("full", True, []),
        "adapter": ("adapter", True, [])}
    assert kinds["adapter"].base == dirs["adapter"] / "../full"
    # With load=True the tensor names were compared: 2 layers x 9 + embed, norm, lm_head.
    expected = {"full": 21, "sharded": 21, "tied": 20, "bin": 21, "adapter": 8} if load else \
        dict.fromkeys(dirs)
    assert {n: r.tensors for n, r in kinds.items()} == expected
    assert isinstance(kinds["full"], ModelDirReport)
    assert validate_model_dir(str(dirs["sharded"])).kind == "sharded"  # a str path too


def _damaged(dirs: dict[str, Path], tmp_path: Path, kind: str,
             damage: Callable[[Path], None]) -> Path:
    d = _copy(dirs[kind], tmp_path / kind)
    if kind == "adapter":
        _set_base(d, str(dirs["full"]))
    damage(d)
    return d


def _rm(*names: str) -> Callable[[Path], None]:
    return lambda d: [(d / n).unlink() for n in names]


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text(text)


BROKEN: dict[str, tuple[str, Callable[[Path], None], list[str]]] = {
    "missing config": ("full", _rm("config.json"), ["config.json is missing"]),
    "config not JSON": ("full", _write("config.json", '{"model_type": '),
                        ["config.json is not valid JSON (Expecting value: line 1 column 16 "
                         "(char 15))"]),
    "config a list": ("full", _write("config.json", "[]"),
                      ["config.json holds a JSON list, not an object"]),
    "missing weights": ("full", _rm("model.safetensors"), [NO_WEIGHTS]),
    "missing tokenizer": ("full", _rm("tokenizer.json", "tokenizer_config.json"),
                          [NO_TOKENIZER]),
    "everything but the tokenizer": (
        "full", _rm("config.json", "model.safetensors"), ["config.json is missing", NO_WEIGHTS]),
    "index not JSON": ("sharded", _write(INDEX, "{"),
                       [f"{INDEX} is not valid JSON (Expecting property name enclosed in double "
                        "quotes: line 1 column 2 (char 1))"]),
    "index a list": ("sharded", _write(INDEX, "[1]"), [f"{INDEX} holds a JSON list, not an "
                                                       "object"]),
    "index without weight_map": ("sharded", _write(INDEX, '{"metadata": {}}'), [
        f"{INDEX} has no 'weight_map' (a non-empty object of tensor name -> shard file), "
        "got null"]),
    "weight_map a list": ("sharded", _write(INDEX, '{"weight_map": [1]}'), [
        f"{INDEX} has no 'weight_map' (a non-empty object of tensor name -> shard file), "
        "got [1]"]),
    "weight_map bad entries": ("sharded", _write(
        INDEX, '{"weight_map": {"a": 3, "b": "../x.safetensors", "c": ""}}'), [
        f"{INDEX}: weight_map entries must name a shard file in the same directory; 3 do not: "
        "'a' -> 3, 'b' -> '../x.safetensors', 'c' -> ''"]),
    "adapter without base named": ("adapter", lambda d: _set_base(d, None), [
        "adapter_config.json names no base model (base_model_name_or_path is None); set it to "
        "the base model's directory"]),
    "adapter without weights": ("adapter", _rm("adapter_model.safetensors"),
                                ["adapter_model.safetensors is missing"]),
    "adapter without config": ("adapter", _rm("adapter_config.json"),
                               ["adapter_config.json is missing"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_variant_is_named(dirs: dict[str, Path], tmp_path: Path, case: str) -> None:
    kind, damage, problems = BROKEN[case]
    d = _damaged(dirs, tmp_path, kind, damage)
    report = validate_model_dir(d)
    assert (report.kind, report.ok, report.problems) == (None, False, problems)
    with pytest.raises(ModelError) as info:
        require_model_dir(d)
    assert str(info.value) == report.message()
    assert str(info.value).splitlines()[1:] == [f"  - {p}" for p in problems]


def test_missing_shards_are_each_named_with_everything_else(dirs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    d = _copy(dirs["sharded"], tmp_path / "d")
    gone = _shards(d)[::2]
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", *gone]:
        (d / name).unlink()
    report = validate_model_dir(d)
    assert report.problems == ["config.json is missing",
                               *(f"shard {s} is missing (listed in {INDEX})" for s in gone),
                               NO_TOKENIZER]
    assert report.message().startswith(f"model directory {d} is not valid ({len(gone) + 2} "
                                       "problems):\n  - config.json is missing\n")


def test_empty_dir_a_file_and_nothing(tmp_path: Path) -> None:
    empty, file = tmp_path / "empty", tmp_path / "model.safetensors"
    empty.mkdir()
    file.write_bytes(b"x")
    assert validate_model_dir(empty).problems == [
        "the directory is empty; a model directory holds config.json, weights and a tokenizer, "
        "an adapter directory adapter_config.json and adapter_model.safetensors"]
    assert validate_model_dir(file).problems == [
        "it is a file, not a directory; give the folder that holds config.json (a model) or "
        "adapter_config.json (a LoRA adapter)"]
    assert validate_model_dir(tmp_path / "absent").problems == [
        "the directory does not exist; check the path"]


def test_adapter_base_problems_are_named(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(dirs["adapter"], tmp_path / "adapter")
    _set_base(d, "no-such-base")
    assert validate_model_dir(d).problems == [
        f"base model no-such-base ({d / 'no-such-base'}): the directory does not exist; check "
        "the path"]
    base = _copy(dirs["full"], tmp_path / "base")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink()
    _set_base(d, str(base))
    assert validate_model_dir(d).problems == [
        f"base model {base} ({base}): config.json is missing",
        f"no tokenizer in the adapter directory or its base model {base}: expected "
        "tokenizer.json or tokenizer_config.json (save one with tokenizer.save_pretrained(DIR))"]
    _set_base(d, str(dirs["adapter"]))
    assert validate_model_dir(d).problems == [
        f"base model {dirs['adapter']} ({dirs['adapter']}) is itself an adapter; name the full "
        "model it was trained on (merge the first adapter to stack them)"]


def test_adapter_helpers_resolve_the_base(dirs: dict[str, Path], tmp_path: Path) -> None:
    assert adapter_base(dirs["adapter"]).resolve() == dirs["full"].resolve()
    assert tokenizer_dir(dirs["adapter"]).resolve() == dirs["full"].resolve()
    assert tokenizer_dir(dirs["full"]) == dirs["full"]
    base = load_base_model(dirs["adapter"])  # the base, without the adapter
    assert type(base).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in base.named_parameters())
    assert base.config._name_or_path == str(dirs["full"].resolve())


# ---------------------------------------------------------------- load=True: tensor names


def _rewrite(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(new, t.pop(old))


def test_load_names_tensors_that_do_not_fit(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(dirs["full"], tmp_path / "renamed")
    _rewrite(d / "model.safetensors", _rename("model.norm.weight", "model.final_norm.weight"))
    assert validate_model_dir(d).ok  # the names are only read with load=True
    assert validate_model_dir(d, load=True).problems == [
        "1 tensors in the weights are not in the LlamaForCausalLM architecture of config.json: "
        "model.final_norm.weight",
        "1 tensors of LlamaForCausalLM are not in the weights: model.norm.weight"]

    d = _copy(dirs["full"], tmp_path / "shape")
    _rewrite(d / "model.safetensors",
             lambda t: t.__setitem__("model.norm.weight", torch.zeros(8)))
    assert validate_model_dir(d, load=True).problems == [
        "1 tensors have another shape than LlamaForCausalLM expects: model.norm.weight [8] "
        "(expected [16])"]

    d = _copy(dirs["full"], tmp_path / "layers")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    (problem,) = validate_model_dir(d, load=True).problems
    assert problem.startswith("9 tensors of LlamaForCausalLM are not in the weights: "
                              "model.layers.2.input_layernorm.weight, ")

    d = _copy(dirs["full"], tmp_path / "torn")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (problem,) = validate_model_dir(d, load=True).problems
    assert problem.startswith("model.safetensors cannot be parsed as safetensors (")

    d = _copy(dirs["full"], tmp_path / "arch")
    (d / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModel"]}))
    assert validate_model_dir(d, load=True).problems[0].startswith(
        "config.json names the architecture 'NoSuchModel', which transformers ")


def test_load_tied_weights_may_be_stored_once_but_not_dropped(dirs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    with open(dirs["tied"] / "model.safetensors", "rb") as f:
        assert b"lm_head" not in f.read(4096)  # transformers stored the tied pair once
    d = _copy(dirs["tied"], tmp_path / "tied")
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.embed_tokens.weight"))
    assert validate_model_dir(d, load=True).problems == [
        "1 tensors of LlamaForCausalLM are not in the weights: lm_head.weight"]


def test_load_checks_the_shard_index_against_the_shards(dirs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    d = _copy(dirs["sharded"], tmp_path / "sharded")
    index = json.loads((d / INDEX).read_text())
    first, other = _shards(d)[0], _shards(d)[-1]
    moved = sorted(n for n, s in index["weight_map"].items() if s == other)[0]
    index["weight_map"][moved] = first
    (d / INDEX).write_text(json.dumps(index))
    assert validate_model_dir(d, load=True).problems == [
        f"1 tensors of the shard index are not in the shard it names: {moved}"]


def test_load_checks_adapter_tensors_against_the_base(dirs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    d = _damaged(dirs, tmp_path, "adapter", lambda d: _rewrite(
        d / "adapter_model.safetensors", _rename(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight")))
    assert validate_model_dir(d, load=True).problems == [
        "1 adapter tensors name modules that the base LlamaForCausalLM does not have: "
        "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"]
    d = _damaged(dirs, tmp_path / "b", "adapter", lambda d: _rewrite(
        d / "adapter_model.safetensors", lambda t: t.__setitem__(
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", torch.zeros(5, 2))))
    assert validate_model_dir(d, load=True).problems == [
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight has shape [5, 2], but "
        "the base layer gives 16 outputs"]


def test_load_accepts_the_embedding_layers_peft_saves_with_an_adapter(
        dirs: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from gearshift.transforms import LoraTransform

    base = load_base_model(dirs["full"])
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    d = tmp_path / "lm_head"
    d.mkdir()
    LoraTransform(None).export(peft, d, merged=False)  # type: ignore[arg-type]
    names = load_file(d / "adapter_model.safetensors").keys()
    assert "base_model.model.lm_head.base_layer.weight" in names  # PEFT keeps the whole layer
    report = validate_model_dir(d, load=True)
    assert (report.kind, report.problems, report.tensors) == ("adapter", [], 7)
    assert report.base == dirs["full"].resolve()


# ---------------------------------------------------------------- the command


def test_model_validate_command(dirs: dict[str, Path], tmp_path: Path, cli) -> None:
    full, sharded, adapter = dirs["full"], dirs["sharded"], dirs["adapter"]
    assert cli("model", "validate", str(full)) == (0, f"{full}: valid full model directory\n", "")
    assert cli("model", "validate", str(sharded), "--load") == (
        0, f"{sharded}: valid sharded model directory (21 tensors match the architecture)\n", "")
    assert cli("model", "validate", str(adapter)) == (
        0, f"{adapter}: valid adapter directory (base: {adapter / '../full'})\n", "")
    broken = _copy(sharded, tmp_path / "broken")
    gone = _shards(broken)[:2]
    for name in [*gone, "config.json"]:
        (broken / name).unlink()
    code, out, err = cli("model", "validate", str(broken))
    assert (code, out) == (2, "")
    assert err == (f"error: model directory {broken} is not valid (3 problems):\n"
                   "  - config.json is missing\n"
                   f"  - shard {gone[0]} is missing (listed in {INDEX})\n"
                   f"  - shard {gone[1]} is missing (listed in {INDEX})\n")
    code, out, err = cli("model", "validate", str(broken), "--json")
    assert (code, err) == (2, "")
    assert json.loads(out) == {
        "path": str(broken), "kind": None, "ok": False, "base": None, "tensors_checked": None,
        "problems": ["config.json is missing",
                     *(f"shard {s} is missing (listed in {INDEX})" for s in gone)]}
    code, out, _ = cli("model", "validate", str(adapter), "--json", "--load")
    assert code == 0 and json.loads(out) == {
        "path": str(adapter), "kind": "adapter", "ok": True, "problems": [],
        "base": str(adapter / "../full"), "tensors_checked": 8}
    code, _, err = cli("model", "validate", str(tmp_path / "absent"))
    assert code == 2 and err == (f"error: model directory {tmp_path / 'absent'} is not valid "
                                 "(1 problem):\n  - the directory does not exist; check the "
                                 "path\n")
    code, _, err = cli("model")
    assert code == 2 and "the following arguments are required: ACTION" in err
    code, out, _ = cli("model", "validate", "--help")
    assert code == 0 and "--load" in out and "adapter_config.json" in out and "exit codes" in out


def test_model_validate_has_no_traceback(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(dirs["full"], tmp_path / "d")
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-type"}))
    (d / "model.safetensors").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "gearshift", "model", "validate", str(d),
                           "--load"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: model directory {d} is not valid (2 problems):"
    assert lines[1].startswith("  - config.json cannot be read by transformers (The checkpoint "
                               "you are trying to load has model type `no-such-type`")
    assert lines[2].startswith("  - model.safetensors cannot be parsed as safetensors (")


def test_every_final_a_run_writes_validates(make_config) -> None:
    import gearshift as gs

    short = {"max_steps": 2, "eval_every": None}
    full = gs.train(make_config(training=short, schedule={"warmup_steps": 0})).final_dir
    report = validate_model_dir(full, load=True)
    assert (report.kind, report.problems, report.tensors) == ("full", [], 12)
    assert (full / "tokenizer.json").is_file()
    lora = gs.train(make_config(training=short, schedule={"warmup_steps": 0},
                                lora={"enabled": True, "r": 2})).final_dir
    report = validate_model_dir(lora, load=True)
    assert (report.kind, report.problems, report.base) == ("adapter", [], lora / "base")
