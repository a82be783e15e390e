"""Tests for gearshift.checkpoint: round trips, files on disk, atomicity, corruption, retention."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gearshift.checkpoint.writer as writer
from gearshift.checkpoint import (
    CheckpointManager,
    LoadedCheckpoint,
    capture_rng_state,
    load_model_tensors,
    load_optimizer_state,
    read_trainer_state,
    restore_rng_state,
    save_optimizer_state,
    step_dir_name,
    verify_checkpoint,
)
from gearshift.errors import CheckpointError

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------- helpers


def make_mlp(seed: int, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def make_llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def mlp_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)) for _ in range(n)]


def llama_batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return [torch.randint(0, 64, (2, 6), generator=gen) for _ in range(n)]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
    for batch in batches:
        if isinstance(batch, tuple):
            x, y = batch
            loss = nn.functional.mse_loss(model(x), y)
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_optimizer_states_equal(a: dict, b: dict) -> None:
    assert set(a["state"]) == set(b["state"])
    for index, state in a["state"].items():
        other = b["state"][index]
        assert list(state) == list(other)
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(other[name], torch.Tensor)
                assert value.dtype == other[name].dtype, (index, name)
                assert torch.equal(value, other[name]), (index, name)
            else:
                assert value == other[name] and type(value) is type(other[name]), (index, name)
    assert a["param_groups"] == b["param_groups"]


def assert_weights_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rehash_manifest(checkpoint: Path) -> None:
    """Make the manifest agree with the files again, as a buggy writer would have."""
    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture()
def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=3)


def save_mlp(manager: CheckpointManager, step: int, seed: int = 0) -> tuple[nn.Module, Path]:
    model = make_mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, mlp_batches(2))
    path = manager.save(step, model=model, optimizer=optimizer, trainer_state={"step": step})
    return model, path


# ---------------------------------------------------------------- round trips


def test_step_dir_name() -> None:
    assert step_dir_name(200) == "step-00000200"
    assert step_dir_name(0) == "step-00000000"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            step_dir_name(bad)  # type: ignore[arg-type]


def test_round_trip_is_bit_exact_and_never_pickles(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle-based serialization was used")

    for target, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps")]:
        monkeypatch.setattr(target, name, forbidden)
    model = make_mlp(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    train_steps(model, optimizer, mlp_batches(3))
    trainer_state = {"step": 3, "epoch": 0, "data": {"position": 15}, "rng": capture_rng_state()}
    path = manager.save(
        3,
        model=model,
        optimizer=optimizer,
        trainer_state=trainer_state,
        extra_json={"phases": {"phase": "warmup", "alpha": 8.0}},
    )

    restored = make_mlp(99)
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=5.0)
    loaded = manager.load(path, model=restored, optimizer=restored_opt)

    assert isinstance(loaded, LoadedCheckpoint)
    assert loaded.path == path and loaded.step == 3
    assert loaded.trainer_state == json.loads(json.dumps(trainer_state))
    assert loaded.extra == {"phases": {"phase": "warmup", "alpha": 8.0}}
    assert read_trainer_state(path) == loaded.trainer_state
    assert_weights_equal(model, restored)
    assert_optimizer_states_equal(optimizer.state_dict(), restored_opt.state_dict())
    assert restored_opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert restored_opt.state_dict()["state"][0]["step"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["mlp-adamw", "mlp-sgd", "llama-tied-adamw"])
def test_resume_matches_uninterrupted_training(manager: CheckpointManager, kind: str) -> None:
    make = make_llama if kind.startswith("llama") else make_mlp
    batches = llama_batches(6) if kind.startswith("llama") else mlp_batches(6)

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        if kind.endswith("sgd"):
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=1e-2)

    straight = make(0)
    straight_opt = make_optimizer(straight)
    train_steps(straight, straight_opt, batches)

    first = make(0)
    first_opt = make_optimizer(first)
    train_steps(first, first_opt, batches[:3])
    path = manager.save(3, model=first, optimizer=first_opt, trainer_state={"step": 3})
    saved_opt_state = first_opt.state_dict()

    resumed = make(7)
    resumed_opt = make_optimizer(resumed)
    manager.load(path, model=resumed, optimizer=resumed_opt)
    assert_optimizer_states_equal(saved_opt_state, resumed_opt.state_dict())
    assert_weights_equal(first, resumed)
    train_steps(resumed, resumed_opt, batches[3:])
    assert_weights_equal(straight, resumed)
    if kind.endswith("sgd"):
        assert "momentum_buffer" in resumed_opt.state_dict()["state"][0]
    if kind.startswith("llama"):
        # Tied weights are stored once and stay tied after loading.
        assert resumed.lm_head.weight is resumed.model.embed_tokens.weight
        stored = load_model_tensors(path)
        assert len(stored) == len(first.state_dict()) - 1


def test_optimizer_state_before_first_step(manager: CheckpointManager) -> None:
    model = make_mlp(0)
    optimizer = torch.optim.AdamW(model.parameters())
    assert optimizer.state_dict()["state"] == {}
    path = manager.save(0, model=model, optimizer=optimizer, trainer_state={"step": 0})
    fresh_opt = torch.optim.AdamW(make_mlp(1).parameters())
    manager.load(path, optimizer=fresh_opt)
    assert fresh_opt.state_dict()["state"] == {}
    assert fresh_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_optimizer_codec_keeps_types_and_non_finite_values(tmp_path: Path) -> None:
    state = {
        "state": {
            0: {"step": torch.tensor(3.0), "buf": torch.arange(6.0).reshape(2, 3).t()},
            2: {"count": 4, "ratio": 0.25, "flag": True, "none": None, "mode": "x"},
            5: {"pair": (torch.ones(2, dtype=torch.bfloat16), 7)},
        },
        "param_groups": [
            {
                "lr": 0.1,
                "betas": (0.9, 0.999),
                "clip": math.inf,
                "floor": -math.inf,
                "params": [0, 2],
            },
            {"lr": math.nan, "weird": {"__tuple__": 1, 3: "int key"}, "params": [5]},
        ],
    }
    written = save_optimizer_state(state, tmp_path)
    assert sorted(p.name for p in written) == ["optimizer.json", "optimizer.safetensors"]
    json.loads((tmp_path / "optimizer.json").read_text())  # strict JSON, no NaN literal
    assert "NaN" not in (tmp_path / "optimizer.json").read_text()
    loaded = load_optimizer_state(tmp_path)

    assert list(loaded["state"]) == [0, 2, 5]
    assert torch.equal(loaded["state"][0]["buf"], state["state"][0]["buf"])
    assert loaded["state"][0]["step"].shape == ()
    assert loaded["state"][2] == state["state"][2]
    pair = loaded["state"][5]["pair"]
    assert isinstance(pair, tuple) and pair[1] == 7
    assert pair[0].dtype == torch.bfloat16 and torch.equal(pair[0], state["state"][5]["pair"][0])
    assert loaded["param_groups"][0] == state["param_groups"][0]
    second = loaded["param_groups"][1]
    assert math.isnan(second["lr"]) and second["params"] == [5]
    assert second["weird"] == {"__tuple__": 1, 3: "int key"}


def test_optimizer_codec_rejects_unstorable_value(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"state\.0\.fn"):
        save_optimizer_state({"state": {0: {"fn": object()}}, "param_groups": []}, tmp_path)


def test_mapping_model_saves_adapter_tensors(manager: CheckpointManager) -> None:
    adapter = {"lora_A": torch.randn(3, 4).t(), "lora_B": torch.zeros(2, 3)}
    path = manager.save(1, model=adapter, trainer_state={"step": 1})
    stored = load_model_tensors(path)
    assert sorted(stored) == ["lora_A", "lora_B"]
    assert all(torch.equal(stored[k], adapter[k]) for k in adapter)

    # A subset loads into a full model only when asked not to be strict.
    full = make_mlp(0)
    part = {"0.weight": torch.full((8, 4), 0.5)}
    part_path = manager.save(2, model=part, trainer_state={"step": 2})
    with pytest.raises(CheckpointError, match=r"missing from checkpoint: 0\.bias"):
        manager.load(part_path, model=full)
    bias_before = full[0].bias.detach().clone()
    manager.load(part_path, model=full, strict=False)
    assert torch.equal(full[0].weight, part["0.weight"])
    assert torch.equal(full[0].bias, bias_before)


def test_full_state_dict_of_tied_model_loads_strict(manager: CheckpointManager) -> None:
    source = make_llama(0)
    path = manager.save(1, model=source.state_dict(), trainer_state={})
    target = make_llama(1)
    manager.load(path, model=target)
    assert_weights_equal(source, target)
    assert target.lm_head.weight is target.model.embed_tokens.weight

    # Dropping both names of the tied pair leaves the weight truly missing.
    untied = {
        k: v for k, v in source.state_dict().items() if "embed" not in k and "lm_head" not in k
    }
    partial = manager.save(2, model=untied, trainer_state={})
    with pytest.raises(CheckpointError) as info:
        manager.load(partial, model=make_llama(1))
    assert "missing from checkpoint: lm_head.weight, model.embed_tokens.weight" in str(info.value)


# ---------------------------------------------------------------- files on disk


def test_files_manifest_and_latest_link(manager: CheckpointManager) -> None:
    model = make_mlp(0)
    optimizer = torch.optim.AdamW(model.parameters())
    train_steps(model, optimizer, mlp_batches(1))
    path = manager.save(
        200,
        model=model,
        optimizer=optimizer,
        trainer_state={"step": 200},
        extra_json={"signals": {}},
    )
    assert path == manager.directory / "step-00000200"
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "manifest.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "signals.json",
        "trainer_state.json",
    ]
    run_dir = manager.directory.parent
    assert not [p for p in run_dir.rglob("*") if p.suffix in {".pt", ".bin", ".pkl", ".pth"}]

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "gearshift-checkpoint"
    assert manifest["version"] == 1 and manifest["step"] == 200
    datetime.fromisoformat(manifest["created"])
    assert sorted(manifest["files"]) == [n for n in names if n != "manifest.json"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert verify_checkpoint(path) == []

    link = manager.directory / "latest"
    assert link.is_symlink() and os.readlink(link) == "step-00000200"
    assert manager.latest() == path
    assert manager.load(link).path == path
    assert manager.save(np.int64(300), model=model, trainer_state={}).name == "step-00000300"
    assert sorted(p.name for p in manager.directory.iterdir()) == [
        "latest",
        "step-00000200",
        "step-00000300",
    ]


def test_latest_is_none_when_absent_or_dangling(manager: CheckpointManager) -> None:
    assert manager.latest() is None and manager.list_checkpoints() == []
    assert manager.find_latest_valid() == (None, [])
    _, path = save_mlp(manager, 1)
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
    assert manager.latest() is None


def test_invalid_arguments_write_nothing(manager: CheckpointManager) -> None:
    model = make_mlp(0)
    with pytest.raises(ValueError, match="trainer_state"):
        manager.save(1, model=model, trainer_state={"loss": math.nan})
    with pytest.raises(ValueError, match="manifest"):
        manager.save(1, model=model, trainer_state={}, extra_json={"manifest": {}})
    with pytest.raises(ValueError, match="file name"):
        manager.save(1, model=model, trainer_state={}, extra_json={"../x": {}})
    with pytest.raises(ValueError, match="step"):
        manager.save(-3, model=model, trainer_state={})
    assert not manager.directory.exists()


# ---------------------------------------------------------------- atomicity


def test_failure_mid_save_keeps_previous_latest(
    manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, first = save_mlp(manager, 1)

    def crash_half_way(path: Path, data: memoryview) -> None:
        path.write_bytes(bytes(data[: len(data) // 2]))
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_durably", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_mlp(manager, 2)
    assert manager.latest() == first
    assert manager.list_checkpoints() == [first]
    assert manager.find_latest_valid() == (first, [])
    assert verify_checkpoint(first) == []
    assert sorted(p.name for p in manager.directory.iterdir()) == ["latest", "step-00000001"]


def test_sigkill_mid_write_leaves_previous_checkpoint(manager: CheckpointManager) -> None:
    _, first = save_mlp(manager, 1)
    # The child really writes half of an 8 MiB model file, says so, then waits to be killed:
    # killing on a signal instead of after a guessed delay makes the test deterministic.
    child = textwrap.dedent(
        """
        import os, sys, time, types

        # Load gearshift.checkpoint without running gearshift/__init__.py (which pulls in the
        # trainer): faster, and it proves the checkpoint layer stands on its own.
        package = types.ModuleType("gearshift")
        package.__path__ = [sys.argv[2]]
        sys.modules["gearshift"] = package

        import torch
        from torch import nn
        import gearshift.checkpoint.writer as writer
        from gearshift.checkpoint import CheckpointManager

        if any(name.startswith(("gearshift.train", "gearshift.cli")) for name in sys.modules):
            raise SystemExit("gearshift.checkpoint imported the trainer or CLI")

        def half_then_hang(path, data):
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            print("HALF", flush=True)
            time.sleep(60)

        writer.write_durably = half_then_hang
        model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
        CheckpointManager(sys.argv[1]).save(2, model=model, trainer_state={"step": 2})
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(manager.directory), str(SRC / "gearshift")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "HALF", proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    leftovers = [p for p in manager.directory.iterdir() if p.name.startswith(".tmp-step-00000002-")]
    assert len(leftovers) == 1 and f"-{proc.pid}-" in leftovers[0].name
    partial = leftovers[0] / "model.safetensors"
    assert 0 < partial.stat().st_size < 8 * 1024 * 1024
    assert manager.latest() == first
    assert manager.list_checkpoints() == [first]
    assert manager.find_latest_valid() == (first, [])
    assert verify_checkpoint(first) == []

    _, third = save_mlp(manager, 3)
    assert not leftovers[0].exists()
    assert manager.list_checkpoints() == [first, third] and manager.latest() == third


def test_stale_cleanup_spares_live_writers_and_restores_moved_aside(
    manager: CheckpointManager,
) -> None:
    _, first = save_mlp(manager, 1)
    d = manager.directory
    ours = d / f".tmp-step-00000005-{os.getpid()}-aaaa"  # an earlier process with our pid
    live = d / f".tmp-step-00000006-{os.getppid()}-bbbb"  # another process still running
    ours.mkdir()
    live.mkdir()
    # A writer died after moving step 4 aside but before renaming its new copy in.
    os.rename(save_mlp(manager, 4)[1], d / f".old-step-00000004-{os.getpid()}-cccc")
    assert [p.name for p in manager.list_checkpoints()] == ["step-00000001"]

    save_mlp(manager, 7)
    assert not ours.exists() and live.exists()
    assert [p.name for p in manager.list_checkpoints()] == [
        "step-00000001",
        "step-00000004",
        "step-00000007",
    ]
    assert verify_checkpoint(d / "step-00000004") == []
    assert verify_checkpoint(first) == []


def test_resaving_a_step_replaces_it(manager: CheckpointManager) -> None:
    old_model, path = save_mlp(manager, 5, seed=0)
    new_model, again = save_mlp(manager, 5, seed=1)
    assert again == path and manager.latest() == path
    assert verify_checkpoint(path) == []
    target = make_mlp(2)
    manager.load(path, model=target)
    assert_weights_equal(new_model, target)
    assert not torch.equal(old_model[0].weight, target[0].weight)
    assert sorted(p.name for p in manager.directory.iterdir()) == ["latest", "step-00000005"]


# ---------------------------------------------------------------- corruption


def test_flipped_byte_is_detected_and_load_refuses(manager: CheckpointManager) -> None:
    _, path = save_mlp(manager, 1)
    flip_byte(path / "model.safetensors")
    problems = verify_checkpoint(path)
    assert len(problems) == 1 and problems[0].startswith("model.safetensors: sha256 mismatch")
    with pytest.raises(CheckpointError) as info:
        manager.load(path, model=make_mlp(0))
    assert str(path) in str(info.value) and "model.safetensors" in str(info.value)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: (p / "optimizer.json").unlink(), "optimizer.json: missing"),
        (
            lambda p: (p / "model.safetensors").write_bytes(
                (p / "model.safetensors").read_bytes()[:50]
            ),
            "model.safetensors: size is 50 bytes",
        ),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json: unreadable"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda p: (p / "notes.txt").write_text("hi"), "notes.txt: present but not listed"),
        (
            lambda p: (p / "manifest.json").write_text(
                (p / "manifest.json").read_text().replace('"sha256": "', '"sha256": "0', 1)
            ),
            "sha256 mismatch",
        ),
    ],
    ids=[
        "deleted",
        "truncated",
        "manifest-garbage",
        "manifest-missing",
        "unlisted",
        "manifest-edited",
    ],
)
def test_damage_is_reported(manager: CheckpointManager, damage, expected: str) -> None:
    _, path = save_mlp(manager, 1)
    damage(path)
    problems = verify_checkpoint(path)
    assert any(expected in p for p in problems), problems
    with pytest.raises(CheckpointError, match="corrupt"):
        manager.load(path, model=make_mlp(0))


def test_find_latest_valid_skips_corrupt_and_keeps_them(manager: CheckpointManager) -> None:
    for step in (1, 2, 3):
        save_mlp(manager, step, seed=step)
    newest = manager.directory / "step-00000003"
    flip_byte(newest / "optimizer.safetensors")
    path, skipped = manager.find_latest_valid()
    assert path == manager.directory / "step-00000002"
    assert len(skipped) == 1 and skipped[0][0] == newest
    assert "optimizer.safetensors" in skipped[0][1]
    assert newest.exists() and manager.latest() == newest


def test_unparseable_safetensors_raise_checkpoint_error(manager: CheckpointManager) -> None:
    _, path = save_mlp(manager, 1)
    model_file = path / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-7])
    rehash_manifest(path)  # the manifest agrees, so only the parser can notice
    assert verify_checkpoint(path) == []
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be parsed"):
        manager.load(path, model=make_mlp(0))
    with pytest.raises(CheckpointError, match="cannot be parsed"):
        load_model_tensors(path)


def test_lying_header_raises_checkpoint_error(manager: CheckpointManager) -> None:
    _, path = save_mlp(manager, 1)
    model_file = path / "model.safetensors"
    data = model_file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4096
    new_header = json.dumps(header).encode()
    model_file.write_bytes(struct.pack("<Q", len(new_header)) + new_header + data[8 + header_len :])
    rehash_manifest(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        manager.load(path, model=make_mlp(0))


def test_shape_mismatch_names_tensor_and_shapes(manager: CheckpointManager) -> None:
    _, path = save_mlp(manager, 1)
    bigger = make_mlp(0, hidden=16)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        manager.load(path, model=bigger)
    message = str(info.value)
    assert "0.weight (model (16, 4), checkpoint (8, 4))" in message
    assert "2.weight (model (2, 16), checkpoint (2, 8))" in message
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())


def test_optimizer_mismatch_raises(manager: CheckpointManager) -> None:
    _, path = save_mlp(manager, 1)
    model = make_mlp(0)
    two_groups = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    )
    with pytest.raises(CheckpointError, match="1 parameter group"):
        manager.load(path, optimizer=two_groups)
    fewer = torch.optim.AdamW(model[0].parameters())
    with pytest.raises(CheckpointError, match="group 0 has 4 parameter"):
        manager.load(path, optimizer=fewer)
    no_opt = manager.save(2, model=model, trainer_state={})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        manager.load(no_opt, optimizer=fewer)


# ---------------------------------------------------------------- retention


def test_retention_keeps_last_n(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in range(1, 6):
        save_mlp(manager, step * 100)
    assert [p.name for p in manager.list_checkpoints()] == ["step-00000400", "step-00000500"]
    assert sorted(p.name for p in manager.directory.iterdir()) == [
        "latest",
        "step-00000400",
        "step-00000500",
    ]


def test_retention_never_deletes_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (4, 5, 3):
        save_mlp(manager, step)
    assert manager.latest() == manager.directory / "step-00000003"
    assert [p.name for p in manager.list_checkpoints()] == [
        "step-00000003",
        "step-00000004",
        "step-00000005",
    ]


@pytest.mark.parametrize("keep_last", [0, -1, True, 2.0])
def test_keep_last_must_be_positive_int(tmp_path: Path, keep_last: object) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=keep_last)  # type: ignore[arg-type]


# ---------------------------------------------------------------- RNG


def draws() -> Iterator[object]:
    yield random.random()
    yield random.gauss(0.0, 1.0)
    yield np.random.rand(3).tolist()
    yield np.random.standard_normal(3).tolist()
    yield torch.rand(3).tolist()
    yield torch.randn(3).tolist()


def test_rng_capture_restore_after_json_round_trip() -> None:
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian in both random and numpy's legacy state
    np.random.standard_normal()
    state = capture_rng_state()
    text = json.dumps(state, allow_nan=False)
    expected = list(draws())
    assert list(draws()) != expected
    restore_rng_state(json.loads(text))
    assert list(draws()) == expected
    assert state["format"] == "gearshift-rng" and state["version"] == 1
    assert isinstance(state["torch"]["cpu"], str)


def test_rng_restore_rejects_bad_state() -> None:
    state = capture_rng_state()
    with pytest.raises(CheckpointError, match="version"):
        restore_rng_state({**state, "version": 99})
    with pytest.raises(CheckpointError, match="malformed"):
        restore_rng_state({**state, "torch": {"cpu": "not base64!"}})


def test_extra_tensors_round_trip_and_are_verified(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    manager = CheckpointManager(tmp_path / "checkpoints")
    signs = {"0": torch.tensor([1, -1, 0], dtype=torch.int8)}
    path = manager.save(1, model=model, trainer_state={"step": 1},
                        extra_tensors={"grad_signs": signs})
    assert (path / "grad_signs.safetensors").is_file()
    loaded = manager.load(path, model=model)
    assert torch.equal(loaded.tensors["grad_signs"]["0"], signs["0"])
    data = bytearray((path / "grad_signs.safetensors").read_bytes())
    data[-1] ^= 0x01
    (path / "grad_signs.safetensors").write_bytes(bytes(data))
    assert any("grad_signs.safetensors" in p for p in verify_checkpoint(path))
