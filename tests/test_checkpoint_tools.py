"""`gearshift checkpoint inspect` and `convert`: real files, exact round trips, refused pickles."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gearshift.checkpoint import convert_checkpoint, inspect_checkpoint, load_converted
from gearshift.cli.main import main


@dataclass
class HParams:
    """A benign custom class: weights_only=True refuses it like any other global."""

    lr: float
    name: str


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def call(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's --help and usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    net(torch.randn(5, 4))  # running stats and the int64 batch counter get real values
    return net


def adam_state(net: torch.nn.Module) -> dict:
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    return opt.state_dict()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same(stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(stored) == set(expected)
    for name, tensor in expected.items():
        assert stored[name].dtype == tensor.dtype, name
        assert torch.equal(stored[name], tensor), name


# ------------------------------------------------------------------------------------ convert


def _write_source(fmt: str, tmp_path: Path, net: torch.nn.Module) -> tuple[Path, Path, dict]:
    """Write ``fmt``; return (SRC argument, the file written, the expected state dict)."""
    sd = net.state_dict()
    if fmt == "plain.pt":
        torch.save(sd, tmp_path / fmt)
    elif fmt == "legacy.pth":
        torch.save(sd, tmp_path / fmt, _use_new_zipfile_serialization=False)
    elif fmt == "pytorch_model.bin":
        (tmp_path / "hf").mkdir()
        torch.save(sd, tmp_path / "hf" / fmt)
        return tmp_path / "hf", tmp_path / "hf" / fmt, sd
    elif fmt == "dict.pt":
        torch.save({"model_state_dict": sd, "optimizer_state_dict": adam_state(net), "epoch": 3,
                    "step": 120, "loss": torch.tensor(0.25), "best": float("inf")}, tmp_path / fmt)
    elif fmt == "last.ckpt":
        sd = {f"model.{k}": v for k, v in sd.items()}
        torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.6.0",
                    "state_dict": sd, "loops": {"fit_loop": {"epoch_progress": {"current": 1}}},
                    "callbacks": {}, "optimizer_states": [adam_state(net)], "lr_schedulers": [],
                    "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "hidden": 3}},
                   tmp_path / fmt)
    return tmp_path / fmt, tmp_path / fmt, sd


@pytest.mark.parametrize("fmt", ["plain.pt", "legacy.pth", "pytorch_model.bin", "dict.pt",
                                 "last.ckpt"])
def test_convert_round_trips_every_format(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          fmt: str) -> None:
    src, written, expected = _write_source(fmt, tmp_path, tiny_net())
    code, out, err = call(capsys, "checkpoint", "convert", src, tmp_path / "out")
    assert code == 0, err
    assert "converted" in out and err == ""
    assert_same(load_file(str(tmp_path / "out" / "model.safetensors")), expected)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["source"]["files"] == [
        {"name": written.name, "bytes": written.stat().st_size, "sha256": sha256(written)}]
    assert meta["source"]["loaded_with"] == "torch.load(weights_only=True)"
    assert meta["aliases"] == {}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    if fmt == "dict.pt":
        assert meta["source"]["kind"] == "checkpoint-dict"
        assert meta["state_dict_key"] == "model_state_dict"
        assert meta["metadata"] == {"epoch": 3, "step": 120, "loss": 0.25, "best": "inf"}
        assert meta["dropped"][0]["key"] == "optimizer_state_dict"
        assert meta["dropped"][0]["what"] == "optimizer state"
    if fmt == "last.ckpt":
        assert meta["source"]["kind"] == "lightning"
        assert meta["name_prefix"] == "model."
        assert meta["metadata"]["global_step"] == 10
        assert meta["metadata"]["hyper_parameters"] == {"lr": 0.1, "hidden": 3}
        assert [d["key"] for d in meta["dropped"]] == ["optimizer_states"]
        assert "dropped: optimizer_states" in out


def test_convert_sharded_bin_index(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sd = tiny_net().state_dict()
    names = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:3],
              "pytorch_model-00002-of-00002.bin": names[3:]}
    for shard, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, tmp_path / shard)
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 123},
                                 "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    code, _, err = call(capsys, "checkpoint", "convert", index, tmp_path / "out")
    assert code == 0, err
    assert_same(load_converted(tmp_path / "out"), sd)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["source"]["kind"] == "sharded-index"
    assert [f["name"] for f in meta["source"]["files"]] == [index.name, *shards]
    assert meta["metadata"]["index"] == {"total_size": 123}

    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    code, _, err = call(capsys, "checkpoint", "convert", tmp_path, tmp_path / "out2")
    assert code == 2 and "pytorch_model-00002-of-00002.bin" in err and "missing" in err


def test_tied_llama_weights_are_stored_once_and_load_back(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=True)).eval()

    model = llama(0)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    result = convert_checkpoint(tmp_path / "pytorch_model.bin", tmp_path / "out")
    assert result.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in stored and len(stored) == len(model.state_dict()) - 1

    fresh = llama(1)
    fresh.load_state_dict(load_converted(tmp_path / "out"))  # strict: every name is there
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert_same(fresh.state_dict(), model.state_dict())
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_overlapping_views_are_stored_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"fused": base, "first_row": base[0], "again": base, "t": base.t()}
    torch.save(sd, tmp_path / "views.pt")
    result = convert_checkpoint(tmp_path / "views.pt", tmp_path / "out")
    assert result.aliases == {"again": "fused"}
    assert result.metadata["overlapping_copied"] == [["first_row", "fused", "t"]]
    assert_same(load_converted(tmp_path / "out"), sd)


def test_malicious_pickle_is_refused_without_running_it(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    net = tiny_net()
    torch.save({"state_dict": net.state_dict(), "epoch": Payload(marker)}, tmp_path / "evil.ckpt")
    code, out, err = call(capsys, "checkpoint", "convert", tmp_path / "evil.ckpt", tmp_path / "out")
    assert code == 2 and out == ""
    assert "refused" in err and "system" in err and "--unsafe-allow-pickle" in err
    assert "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # The payload is live: unpickling the file for real does run it.
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_unsafe_allow_pickle_loads_a_trusted_custom_class(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    sd = tiny_net().state_dict()
    torch.save({"state_dict": sd, "hparams": HParams(lr=0.1, name="mine")}, tmp_path / "own.pt")
    code, _, err = call(capsys, "checkpoint", "convert", tmp_path / "own.pt", tmp_path / "out")
    assert code == 2 and "HParams" in err and not (tmp_path / "out").exists()

    code, out, err = call(capsys, "checkpoint", "convert", tmp_path / "own.pt", tmp_path / "out",
                          "--unsafe-allow-pickle")
    assert code == 0, err
    assert "WARNING" in err and "EXECUTES ARBITRARY CODE" in err and "own.pt" in err
    assert_same(load_converted(tmp_path / "out"), sd)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["source"]["unpickled_unsafely"] == ["own.pt"]
    assert "HParams" in meta["metadata"]["hparams"] and "mine" in meta["metadata"]["hparams"]


def test_destination_needs_force(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save(tiny_net().state_dict(), tmp_path / "a.pt")
    other = {"w": torch.ones(2)}
    torch.save(other, tmp_path / "b.pt")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    assert call(capsys, "checkpoint", "convert", tmp_path / "a.pt", dst)[0] == 0
    code, _, err = call(capsys, "checkpoint", "convert", tmp_path / "b.pt", dst)
    assert code == 2 and "already contains model.safetensors" in err and "--force" in err
    assert call(capsys, "checkpoint", "convert", tmp_path / "b.pt", dst, "--force")[0] == 0
    assert_same(load_converted(dst), other)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "metadata.json",
                                                     "model.safetensors"]


def test_convert_errors_exit_2_with_one_message(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.bin").write_bytes(b"not a torch file at all")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pt")
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "two").mkdir()
    for name in ("x.pt", "y.pt"):
        torch.save({"w": torch.ones(1)}, tmp_path / "two" / name)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{}")
    cases = {"missing.pt": "does not exist", "truncated.pt": "not a readable torch file",
             "garbage.bin": "not a readable torch file", "empty.pt": "no tensors found",
             "w.safetensors": "already safetensors", "two": "x.pt, y.pt"}
    for src, expected in cases.items():
        code, out, err = call(capsys, "checkpoint", "convert", tmp_path / src, tmp_path / "o")
        assert code == 2 and out == "", src
        assert err.startswith("error: ") and expected in err and "Traceback" not in err, err
    code, _, err = call(capsys, "checkpoint", "convert", tmp_path / "good.pt", ckpt)
    assert code == 2 and "gearshift checkpoint" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ inspect


PHASES = {"window": 5, "phases": [
    {"name": "foundation", "alpha": 8, "min_steps": 5, "max_steps": 10},
    {"name": "balance", "alpha": 16}]}


@pytest.fixture
def trained_run(make_config) -> Path:
    from gearshift import train

    cfg = make_config(training={"max_steps": 6, "eval_every": 100},
                      lora={"enabled": True, "r": 4, "alpha": 8}, phases=PHASES,
                      checkpoint={"every": 3})
    return train(cfg).run_dir


def test_inspect_a_trained_run(capsys: pytest.CaptureFixture[str], trained_run: Path) -> None:
    code, out, err = call(capsys, "checkpoint", "inspect", trained_run)
    assert code == 0, err
    assert "checkpoints/step-00000006" in out.splitlines()[0]
    assert "step:      6 of 6" in out
    assert "phase:     foundation (1/2), 6 steps in phase" in out
    assert "schedule:  warmup_cosine at 6/6 steps, multiplier 0.1" in out
    assert "data:      epoch 0, micro batch 6" in out
    assert "manifest:  ok" in out
    for name in ("model.safetensors", "optimizer.safetensors", "grad_signs.safetensors",
                 "dtype", "shape", "float32"):
        assert name in out
    report = json.loads(call(capsys, "checkpoint", "inspect",
                             trained_run / "checkpoints" / "latest", "--json")[1])
    assert report["step"] == 6 and report["manifest"] == {"status": "ok", "problems": []}
    assert report["phase"] == {"name": "foundation", "index": 0, "count": 2, "steps_in_phase": 6}
    assert report["schedule"]["last_epoch"] == 6 and report["data"]["micro_batch"] == 6
    model = next(f for f in report["files"] if f["name"] == "model.safetensors")
    stored = load_file(str(trained_run / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert {t["name"]: t["shape"] for t in model["tensors"]} == {
        k: list(v.shape) for k, v in stored.items()}
    assert model["tensor_bytes"] == sum(v.numel() * v.element_size() for v in stored.values())
    assert report["totals"]["tensors"] == sum(f["tensor_count"] for f in report["files"])

    # One safetensors file on its own, and the older checkpoint by its folder.
    code, out, _ = call(capsys, "checkpoint", "inspect",
                        trained_run / "checkpoints" / "step-00000003" / "model.safetensors")
    assert code == 0 and out.startswith("safetensors:") and "manifest" not in out
    assert inspect_checkpoint(trained_run / "checkpoints" / "step-00000003").step == 3

    # A flipped byte in the tensor data: the header still reads, the manifest catches it.
    victim = trained_run / "checkpoints" / "step-00000006" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, out, _ = call(capsys, "checkpoint", "inspect", trained_run)
    assert code == 0
    assert "manifest:  CORRUPT (1 problem)" in out and "model.safetensors: sha256 mismatch" in out
    assert inspect_checkpoint(trained_run).manifest == "corrupt"


def test_inspect_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / "plain").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    cases = {"missing": "does not exist", "w.pt": "convert", "bad.safetensors": "cannot be parsed",
             "plain": "not a checkpoint", "run": "holds no step-* checkpoints"}
    for name, expected in cases.items():
        code, out, err = call(capsys, "checkpoint", "inspect", tmp_path / name)
        assert code == 2 and out == "" and err.startswith("error: "), name
        assert expected in err and "Traceback" not in err, err


def test_inspect_a_converted_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, tmp_path / "a.pt")
    convert_checkpoint(tmp_path / "a.pt", tmp_path / "out")
    code, out, _ = call(capsys, "checkpoint", "inspect", tmp_path / "out")
    assert code == 0 and "manifest:  none" in out
    assert ["w", "bfloat16", "[2,", "3]", "12", "B"] in [line.split() for line in out.splitlines()]


def test_help_and_a_real_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = call(capsys, "checkpoint", "--help")
    assert code == 0 and all(a in out for a in ("inspect", "verify", "convert"))
    code, out, _ = call(capsys, "checkpoint", "inspect", "--help")
    assert code == 0 and "--json" in out and "PATH" in out
    code, out, _ = call(capsys, "checkpoint", "convert", "--help")
    assert code == 0 and "--unsafe-allow-pickle" in out and "--force" in out and "SRC" in out

    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "gearshift", "checkpoint", "convert",
                           str(tmp_path / "evil.pt"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "refused" in proc.stderr
    assert not marker.exists()
