"""The training daemon: inbox → processing → done / failed, verified snapshots, the status
file, the pid lock, rollback, memory limits, and the settle rule. Real tiny models, real files.

The kill tests (real subprocesses, SIGKILL) are in ``tests/test_daemon_kill.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gearshift.daemon import DaemonPaths, list_snapshots, verify_snapshot
from gearshift.daemon.inbox import Inbox, is_ignored
from gearshift.daemon.snapshots import current_snapshot
from gearshift.models import validate_model_dir


def daemon_config(**sections: Any) -> dict[str, Any]:
    """A ~20k-parameter chat model with LoRA: a file of 24 conversations trains in seconds."""
    cfg: dict[str, Any] = {
        "name": "svc", "task": "sft", "seed": 3,
        "model": {"tokenizer": "auto", "build": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 128}},
        "data": {"source": "jsonl", "seq_len": 96, "eval_fraction": 0.1},
        "profile": {"name": "concise", "date": "2026-12-03"},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "optim": {"learning_rate": 3e-3},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 1},
        "training": {"epochs": 1, "batch_size": 4, "gradient_checkpointing": True,
                     "eval_every": None, "log_every": 1},
        "checkpoint": {"every": 2, "keep_last": 3},
        "logging": {"progress_bar": False, "tensorboard": False},
        "daemon": {"settle_seconds": 0, "poll_seconds": 0.2, "status_every_seconds": 0.5},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(cfg.get(section), dict) else values
    return cfg


def write_chats(path: Path, n: int, offset: int = 0) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(offset, offset + n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"{i % 10}+1="},
                                              {"role": "assistant",
                                               "content": str(i % 10 + 1)}]}) + "\n")
    return path


def init_base(tmp_path: Path, cli: Any, name: str = "svc", **sections: Any) -> DaemonPaths:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(daemon_config(**sections)))
    code, out, err = cli("daemon", "init", str(tmp_path / name), "--config", str(config))
    assert code == 0, err
    return DaemonPaths(tmp_path / name)


def drop(paths: DaemonPaths, name: str, n: int, *, age: float, offset: int = 0) -> Path:
    """A file written under a .tmp name and renamed into the inbox, ``age`` seconds old."""
    tmp = write_chats(paths.inbox / f".{name}.tmp", n, offset)
    final = paths.inbox / name
    os.replace(tmp, final)
    t = final.stat().st_mtime - age
    os.utime(final, (t, t))
    return final


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "events.jsonl").open()]
    return [r for r in rows if r["event"] == kind]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------- the whole trip


def test_good_files_done_bad_files_failed_snapshots_verified_and_rollback(
        tmp_path: Path, cli: Any) -> None:
    paths = init_base(tmp_path, cli)
    initial = current_snapshot(paths)
    assert initial is not None and validate_model_dir(initial).kind == "full"
    # Oldest first: c, then a, then b, whatever their names.
    drop(paths, "c.jsonl", 20, age=30)
    drop(paths, "a.jsonl", 20, age=20, offset=3)
    drop(paths, "b.jsonl", 20, age=10, offset=5)
    bad = paths.inbox / "bad.jsonl"
    write_chats(bad, 4)
    with bad.open("a") as fh:
        fh.write('{"messages": [oops\n')
    os.utime(bad, (bad.stat().st_mtime - 25,) * 2)
    (paths.inbox / "empty.jsonl").write_text("")
    write_chats(paths.inbox / "short.jsonl", 1)
    (paths.inbox / "partial.jsonl.partial").write_text("{")  # being written: never taken
    paths.pid.write_text(f"{dead_pid()}\n")  # a daemon that died without cleaning up

    code, out, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 0, err
    assert "taking over a stale daemon.pid" in err and "is gone" in err

    done = sorted(p.name for p in paths.done.iterdir())
    assert done == ["a.jsonl", "a.jsonl.result.json", "b.jsonl", "b.jsonl.result.json",
                    "c.jsonl", "c.jsonl.result.json"]
    results = {n: read_json(paths.done / f"{n}.result.json") for n in ("a.jsonl", "b.jsonl",
                                                                        "c.jsonl")}
    # Each file started from the model the previous one left: c → a → b.
    assert results["c.jsonl"]["start_model"] == initial.name
    assert results["a.jsonl"]["start_model"] == results["c.jsonl"]["snapshot"]
    assert results["b.jsonl"]["start_model"] == results["a.jsonl"]["snapshot"]
    for r in results.values():
        assert r["steps"] == 5 and r["resumes"] == 0 and r["peak_memory_mb"] > 0
        assert r["metrics"]["eval/loss"] < r["metrics"]["eval/loss_before"]
    assert os.readlink(paths.current_model) == f"snapshots/{results['b.jsonl']['snapshot']}"

    errors = {p.name: read_json(p) for p in paths.failed.glob("*.error.json")}
    assert sorted(errors) == ["bad.jsonl.error.json", "empty.jsonl.error.json",
                              "short.jsonl.error.json"]
    assert errors["bad.jsonl.error.json"]["line"] == 5
    assert errors["bad.jsonl.error.json"]["location"] == "bad.jsonl:5"
    assert "not valid JSON" in errors["bad.jsonl.error.json"]["reason"]
    assert "empty" in errors["empty.jsonl.error.json"]["reason"]
    assert "1 usable example, fewer than daemon.min_examples=2" in \
        errors["short.jsonl.error.json"]["reason"]
    assert sorted(p.name for p in paths.failed.iterdir() if not p.name.endswith(".json")) == \
        ["bad.jsonl", "empty.jsonl", "short.jsonl"]
    assert list(paths.processing.iterdir()) == []
    assert [p.name for p in paths.inbox.iterdir()] == ["partial.jsonl.partial"]

    snaps = list_snapshots(paths)
    assert [s.name for s in snaps] == [initial.name] + [results[n]["snapshot"] for n in
                                                        ("c.jsonl", "a.jsonl", "b.jsonl")]
    for snap in snaps:
        assert verify_snapshot(snap) == []
        assert validate_model_dir(snap).ok
    status = read_json(paths.status)
    assert status["state"] == "stopped" and status["files_done"] == 3
    assert status["files_failed"] == 3 and status["queue_length"] == 0  # .partial: not queued
    assert status["model_kind"] == "adapter" and status["current_file"] is None
    assert status["system_prompt"] == \
        "Current date: 2026-12-03. Respond naturally and concisely."
    code, out, _ = cli("daemon", "status", str(paths.base))
    assert code == 0 and "3 done, 3 failed, 0 waiting" in out and "(current)" in out

    # Roll back: a name that is not there, a damaged snapshot, then the first file's model.
    code, _, err = cli("daemon", "rollback", str(paths.base), "nope")
    assert code == 2 and "no snapshot 'nope'" in err and initial.name in err
    damaged = paths.snapshots / results["a.jsonl"]["snapshot"]
    weights = damaged / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = cli("daemon", "rollback", str(paths.base), damaged.name)
    assert code == 2 and "damaged" in err and "adapter_model.safetensors: sha256" in err
    assert os.readlink(paths.current_model) == f"snapshots/{results['b.jsonl']['snapshot']}"
    target = results["c.jsonl"]["snapshot"]
    code, out, err = cli("daemon", "rollback", str(paths.base), target)
    assert code == 0, err
    assert os.readlink(paths.current_model) == f"snapshots/{target}"
    # The next file starts from the rolled-back model, and its name was taken before.
    drop(paths, "a.jsonl", 12, age=5, offset=7)
    code, _, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 0, err
    again = [read_json(p) for p in paths.done.glob("*-a.jsonl.result.json")]
    assert len(again) == 1 and again[0]["start_model"] == target
    assert again[0]["received_as"] == "a.jsonl"


def test_keep_snapshots_never_removes_the_base_of_a_kept_adapter(tmp_path: Path,
                                                                 cli: Any) -> None:
    paths = init_base(tmp_path, cli, daemon={"settle_seconds": 0, "keep_snapshots": 1})
    initial = current_snapshot(paths)
    drop(paths, "x.jsonl", 8, age=20)
    drop(paths, "y.jsonl", 8, age=10)
    code, _, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 0, err
    snaps = [s.name for s in list_snapshots(paths)]
    y = read_json(paths.done / "y.jsonl.result.json")["snapshot"]
    x = read_json(paths.done / "x.jsonl.result.json")["snapshot"]
    # x's snapshot is gone (keep 1); the initial full model stays: y's adapter is built on it.
    assert snaps == [initial.name, y] and x not in snaps
    assert validate_model_dir(paths.current_model).ok


# ---------------------------------------------------------------------------- memory


def test_out_of_memory_recovers_and_a_file_that_never_fits_fails(tmp_path: Path,
                                                                  cli: Any) -> None:
    paths = init_base(tmp_path, cli, faults={"oom_when_batch_above": 2},
                      daemon={"settle_seconds": 0, "max_memory_mb": 1})
    drop(paths, "fits.jsonl", 12, age=5)
    code, _, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 0, err
    result = read_json(paths.done / "fits.jsonl.result.json")
    run_dir = Path(result["run"])
    oom = events(run_dir, "oom_recovery")
    assert oom and oom[0]["micro_batch"] == 2
    limit = events(run_dir, "memory_limit")  # 1 MiB: every step is above it
    assert [e["micro_batch"] for e in limit] == [1]
    assert limit[0]["max_memory_mb"] == 1 and limit[0]["peak_memory_mb"] > 1
    before = os.readlink(paths.current_model)

    config = yaml.safe_load(paths.config.read_text())
    config["faults"] = {"oom_when_batch_above": 0}  # not even one sample fits
    paths.config.write_text(yaml.safe_dump(config))
    drop(paths, "never.jsonl", 12, age=5)
    code, _, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 0, err
    error = read_json(paths.failed / "never.jsonl.error.json")
    assert error["kind"] == "TrainingDiverged" and "out of memory" in error["reason"]
    assert os.readlink(paths.current_model) == before  # untouched
    assert read_json(paths.status)["last_error"] == error["reason"]


# ---------------------------------------------------------------------------- the inbox


def test_a_growing_file_is_taken_only_once_it_settles(tmp_path: Path) -> None:
    now = [1_000_000.0]
    inbox = Inbox(tmp_path, settle_seconds=2.0, clock=lambda: now[0])
    growing = tmp_path / "growing.jsonl"
    growing.write_text("{}\n")
    os.utime(growing, (now[0], now[0]))
    old = tmp_path / "old.jsonl"
    old.write_text("{}\n")
    os.utime(old, (now[0] - 60, now[0] - 60))
    (tmp_path / ".hidden.jsonl").write_text("{}\n")
    (tmp_path / "upload.jsonl.tmp").write_text("{}\n")
    assert inbox.ready() == [old]  # dropped long ago (e.g. while the daemon was down)
    assert inbox.next_settle_in() == pytest.approx(2.0)
    now[0] += 1.5
    with growing.open("a") as fh:  # still being copied: size and mtime change
        fh.write("{}\n")
    os.utime(growing, (now[0], now[0]))
    now[0] += 1.0
    assert inbox.ready() == [old]  # changed 1 s ago
    now[0] += 1.5
    assert inbox.ready() == [old, growing]  # 2.5 s unchanged: settled, oldest first
    assert [p.name for p in inbox.candidates()] == ["old.jsonl", "growing.jsonl"]
    assert is_ignored(".x.jsonl") and is_ignored("x.jsonl.partial") and not is_ignored("x.jsonl")


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_exit_code_2(tmp_path: Path, cli: Any) -> None:
    code, _, err = cli("daemon", "run", str(tmp_path / "nothing"))
    assert code == 2 and "gearshift daemon init" in err
    (tmp_path / "plain").mkdir()
    code, _, err = cli("daemon", "status", str(tmp_path / "plain"))
    assert code == 2 and "is not a daemon directory" in err and "daemon.yaml" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(daemon_config(
        data={"source": "synthetic", "synthetic": {"name": "addition"}},
        daemon={"stage_delay_s": {"snapshot": 1}})))
    code, _, err = cli("daemon", "init", str(tmp_path / "b"), "--config", str(bad))
    assert code == 2 and "daemon.stage_delay_s: unknown stage 'snapshot'" in err
    assert not (tmp_path / "b").exists()
    code, _, err = cli("daemon", "init", str(tmp_path / "c"), "--model", str(tmp_path / "plain"))
    assert code == 2 and "the directory is empty" in err
    paths = init_base(tmp_path, cli)
    code, _, err = cli("daemon", "init", str(paths.base))
    assert code == 2 and "already holds a daemon" in err
    config = yaml.safe_load(paths.config.read_text())
    config["task"], config["data"]["source"] = "lm", "text"
    paths.config.write_text(yaml.safe_dump(config))
    code, _, err = cli("daemon", "run", str(paths.base), "--drain")
    assert code == 2 and "data.source" in err and "set data.source: jsonl" in err
    code, _, err = cli("daemon", "status", str(paths.base), "--json")
    assert code == 2 and "never run" in err


def test_init_writes_a_daemon_config_with_gradient_checkpointing(tmp_path: Path,
                                                                 cli: Any) -> None:
    from gearshift.config import load_config
    from gearshift.daemon import DEFAULT_CONFIG

    code, out, err = cli("daemon", "init", str(tmp_path / "svc"))
    assert code == 0, err
    paths = DaemonPaths(tmp_path / "svc")
    assert paths.config.read_text() == DEFAULT_CONFIG
    cfg = load_config(paths.config, {"data.paths": ["x.jsonl"]})
    assert cfg.training.gradient_checkpointing and cfg.task == "sft"
    example = Path(__file__).parents[1] / "examples" / "daemon.yaml"
    assert load_config(example, {"data.paths": ["x.jsonl"]}) == cfg
    for folder in paths.folders:
        assert folder.is_dir()
    assert validate_model_dir(paths.current_model).kind == "full"
    assert f"current model: snapshot {list_snapshots(paths)[0].name}" in out


def test_init_from_a_model_directory_and_the_status_of_a_killed_daemon(tmp_path: Path,
                                                                       cli: Any) -> None:
    from gearshift.daemon.status import FIELDS, StatusFile, describe

    first = init_base(tmp_path, cli)
    model = tmp_path / "my-model"
    source = list_snapshots(first)[0]
    model.mkdir()
    for f in source.iterdir():
        if f.name != "snapshot.json":
            (model / f.name).write_bytes(f.read_bytes())
    config = tmp_path / "svc.yaml"
    code, out, err = cli("daemon", "init", str(tmp_path / "second"), "--model", str(model),
                         "--config", str(config))
    assert code == 0, err
    second = DaemonPaths(tmp_path / "second")
    snap = list_snapshots(second)[0]
    manifest = read_json(snap / "snapshot.json")
    assert manifest["model_name"] == "my-model" and manifest["kind"] == "full"
    assert manifest["files"]["model.safetensors"]["sha256"] == \
        read_json(source / "snapshot.json")["files"]["model.safetensors"]["sha256"]

    status = StatusFile(second.status, every_seconds=60)
    status.update(state="training", pid=12345, current_file="a.jsonl", current_step=3,
                  total_steps=10, loss=1.5, learning_rate=1e-3, eta_seconds=75, files_done=2,
                  files_failed=1, queue_length=4, model_kind="adapter")
    written = read_json(second.status)
    assert set(written) == set(FIELDS) and written["state"] == "training"
    with pytest.raises(KeyError, match="unknown status fields"):
        status.update(steps=3)
    text = describe(written, alive=False)
    assert "training (but no daemon holds the pid lock: it was killed" in text
    assert "a.jsonl (step 3/10, loss 1.5000, lr 1.00e-03, eta 1m15s)" in text
    assert "2 done, 1 failed, 4 waiting" in text
    code, out, _ = cli("daemon", "status", str(second.base))
    assert code == 0 and "it was killed" in out and f"{snap.name} (current)" in out
