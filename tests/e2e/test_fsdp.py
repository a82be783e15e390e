"""`distributed.strategy: fsdp` on two CPU processes (gloo): the same training as DDP, consolidated
checkpoints and final/, LoRA with only the adapters trainable, a resume on one process, and the
gradient-sign signal reduced from each rank's shard."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gearshift.checkpoint import verify_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SIGNS_WORKER = Path(__file__).with_name("sharded_signs_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gearshift(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "gearshift", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


def launch(config: Path, run_dir: str, cwd: Path) -> str:
    return gearshift("launch", "--num_processes", "2", "--main_process_port", str(free_port()),
                     "--", "train", str(config), "--run-dir", run_dir, cwd=cwd)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").open()]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").open() if '"loss"' in x]


@pytest.mark.slow
def test_fsdp_trains_as_ddp_and_checkpoints_whole(make_config, tmp_path: Path) -> None:
    cfg = make_config(training={"max_steps": 4, "eval_every": None, "log_every": 1},
                      checkpoint={"every": 2, "keep_last": 5}, report={"enabled": False})
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    cfg["distributed"] = {"strategy": "fsdp", "fsdp": {"wrap": ["LlamaDecoderLayer"]}}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    launch(tmp_path / "ddp.yaml", "ddp", tmp_path)
    out = launch(tmp_path / "fsdp.yaml", "fsdp", tmp_path)
    assert out.count("run directory: fsdp") == 1  # the first process reports
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    start = next(e for e in events(fsdp) if e["event"] == "start")
    assert (start["strategy"], start["sharded"], start["processes"]) == ("fsdp", True, 2)

    # Sharding changes where the numbers live, not the numbers.
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    final, reference = load_file(str(fsdp / "final" / "model.safetensors")), \
        load_file(str(ddp / "final" / "model.safetensors"))
    assert final.keys() == reference.keys()
    for name in final:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-5, atol=1e-6)

    # Checkpoints hold the consolidated state: whole tensors, optimizer state by name.
    ckpt = fsdp / "checkpoints" / "step-00000004"
    assert verify_checkpoint(ckpt) == []
    whole = load_file(str(ckpt / "model.safetensors"))
    assert {n: t.shape for n, t in whole.items()} == {n: t.shape for n, t in final.items()}
    layout = json.loads((ckpt / "optimizer.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in layout["param_groups"][0]["params"]
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert moments["state.lm_head.weight.exp_avg"].shape == final["lm_head.weight"].shape

    # final/ is a plain transformers model directory.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp / "final")
    assert torch.equal(model.state_dict()["lm_head.weight"], final["lm_head.weight"])

    # Resumed on one process (batch 16 = 2 x 8) from the two-process checkpoint of step 2:
    # the same steps 3-4.
    shutil.copytree(fsdp, tmp_path / "again", symlinks=True, ignore=shutil.ignore_patterns("step-00000004"))
    (tmp_path / "again" / "checkpoints" / "latest").unlink()  # it named step 4
    gearshift("resume", "again", "--set", "training.batch_size=16", cwd=tmp_path)  # same global batch
    assert losses(tmp_path / "again")[2:] == pytest.approx(losses(fsdp)[2:], rel=1e-4)
    resumed = load_file(str(tmp_path / "again" / "final" / "model.safetensors"))
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_under_fsdp_exports_an_adapter(make_config, tmp_path: Path) -> None:
    cfg = make_config(training={"max_steps": 4, "eval_every": None, "log_every": 1},
                      checkpoint={"every": 4}, report={"enabled": False},
                      lora={"enabled": True, "r": 4, "alpha": 8})
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    # The other FSDP options too: SHARD_GRAD_OP and FSDP's activation checkpointing.
    cfg["distributed"] = {"strategy": "fsdp", "fsdp": {"reshard_after_forward": False,
                                                       "activation_checkpointing": True}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    launch(tmp_path / "ddp.yaml", "ddp", tmp_path)
    launch(tmp_path / "cfg.yaml", "lora", tmp_path)
    run = tmp_path / "lora"
    assert losses(run) == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    stored = load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert stored and all("lora_" in name for name in stored)  # only the adapters trained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run / "final" / "base")
    model = PeftModel.from_pretrained(base, run / "final")
    adapter = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert adapter and any(float(p.abs().max()) > 0 for p in adapter.values())  # B moved from 0


@pytest.mark.slow
def test_sign_signal_from_shards_equals_the_unsharded_value(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(SIGNS_WORKER), str(tmp_path)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["local_numel"] != r1["local_numel"]  # shards of different sizes
    assert r0["sharded"][0] is None and r0["whole"][0] is None
    assert r0["sharded"][1:] == pytest.approx(r0["whole"][1:], abs=1e-12)
    assert r0["sharded"] == r1["sharded"]  # every rank gets the same value
    # Each rank alone sees another fraction, and a plain mean of them is not the whole value.
    assert r0["local"][1:] != pytest.approx(r1["local"][1:], abs=1e-6)
    plain = [(a + b) / 2 for a, b in zip(r0["local"][1:], r1["local"][1:], strict=True)]
    assert plain != pytest.approx(r0["whole"][1:], abs=1e-6)
    # The signs are saved whole and loaded back into the shards.
    assert r0["same_signs"] and r1["same_signs"]
    assert r0["sharded_after_load"] == pytest.approx(r0["whole_after_load"], abs=1e-12)
