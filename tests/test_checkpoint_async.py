"""Asynchronous saves of CheckpointManager: the snapshot, the handle, one save in flight, hashing
from memory, retention after commit, writer errors, and checkpoints written before all this."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save
from torch import nn

import gearshift.checkpoint.manifest as manifest_module
import gearshift.checkpoint.writer as writer
from gearshift.checkpoint import CheckpointManager, PendingSave, verify_checkpoint
from gearshift.checkpoint.snapshot import model_tensors, serialize_tensors

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_checkpoint" / "step-00000003"


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(5, 4, generator=gen)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def contents(path: Path) -> dict[str, bytes]:
    """Every file's bytes, the manifest without its creation time."""
    out = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    manifest = json.loads(out.pop("manifest.json"))
    manifest.pop("created")
    out["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return out


def save_both(model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
              sync: CheckpointManager, background: CheckpointManager) -> tuple[Path, Path]:
    state = {"step": step, "note": "same"}
    extra = {"signs": {"ema": torch.arange(6, dtype=torch.float32) * step}}
    a = sync.save(step, model=model, optimizer=optimizer, trainer_state=state,
                  extra_json={"task": {"k": step}}, extra_tensors=extra)
    handle = background.save(step, model=model, optimizer=optimizer, trainer_state=state,
                             extra_json={"task": {"k": step}}, extra_tensors=extra,
                             asynchronous=True)
    assert isinstance(handle, PendingSave) and handle.step == step
    return a, handle.wait()


def test_async_and_sync_saves_write_byte_identical_checkpoints(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sync = CheckpointManager(tmp_path / "sync", keep_last=5)
    background = CheckpointManager(tmp_path / "async", keep_last=5)
    # Step 0 (no optimizer state yet), then steps whose snapshots refill the kept memory.
    for step in (0, 2, 5):
        train(model, optimizer, step and 2, seed=step)
        a, b = save_both(model, optimizer, step, sync, background)
        assert b == tmp_path / "async" / f"step-{step:08d}"
        assert contents(a) == contents(b)
        assert verify_checkpoint(b) == []
    assert background.latest() == tmp_path / "async" / "step-00000005"


def test_refilled_memory_holds_what_safetensors_writes(tmp_path: Path) -> None:
    model = make_model()
    tensors, metadata = model_tensors(model)
    image = serialize_tensors(tensors, metadata)
    image.keep()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.5)
    tensors, metadata = model_tensors(model)
    assert serialize_tensors(tensors, metadata, image) is image  # refilled in place
    assert bytes(image.view()) == save({k: v.contiguous() for k, v in tensors.items()}, metadata)


def test_snapshot_is_taken_when_save_returns(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    manager = CheckpointManager(tmp_path, write_hook=lambda path: time.sleep(0.05))
    handle = manager.save(2, model=model, optimizer=optimizer, trainer_state={"step": 2},
                          asynchronous=True)
    train(model, optimizer, 3, seed=9)  # training goes on while the writer writes
    path = handle.wait()
    stored = load_file(path / "model.safetensors")
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert not torch.equal(model.state_dict()["0.weight"], expected["0.weight"])
    fresh = make_model(5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    manager.load(path, model=fresh, optimizer=fresh_opt)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], expected_avg)


def test_one_save_in_flight_and_retention_after_commit(tmp_path: Path) -> None:
    seen: list[tuple[str, list[str]]] = []

    def slow(path: Path) -> None:
        seen.append((path.name, sorted(p.name for p in path.parent.parent.iterdir()
                                       if p.name.startswith("step-"))))
        time.sleep(0.05)

    model = make_model()
    manager = CheckpointManager(tmp_path, keep_last=1, write_hook=slow)
    first = manager.save(1, model=model, trainer_state={}, asynchronous=True)
    second = manager.save(2, model=model, trainer_state={}, asynchronous=True)
    # The second save began only after the first had committed, and says how long it waited.
    assert first.done() and first.wait() == tmp_path / "step-00000001"
    assert second.waited_s > 0 and second.blocked_s >= second.waited_s
    assert manager.in_flight is second
    assert manager.wait() == tmp_path / "step-00000002"
    # While step 2 was written, step 1 was still there: retention runs after the commit.
    assert all(listing == ["step-00000001"] for name, listing in seen[2:])
    assert [p.name for p in manager.list_checkpoints()] == ["step-00000002"]
    assert manager.in_flight is None


def test_manifest_hashes_from_memory_never_reading_files_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reading(path: Path) -> str:
        raise AssertionError(f"{path} was read back to hash it")

    monkeypatch.setattr(manifest_module, "sha256_file", no_reading)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 1)
    path = CheckpointManager(tmp_path).save(1, model=model, optimizer=optimizer,
                                            trainer_state={"step": 1})
    monkeypatch.undo()
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors",
                                      "optimizer.json", "trainer_state.json"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()  # what `sha256sum` sees
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_writer_error_is_raised_by_wait_and_keeps_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    manager = CheckpointManager(tmp_path, keep_last=3)
    first = manager.save(1, model=model, trainer_state={})
    real = writer.write_durably

    def disk_full(path: Path, data: memoryview) -> None:
        real(path, data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "write_durably", disk_full)
    handle = manager.save(2, model=model, trainer_state={}, asynchronous=True)
    with pytest.raises(OSError, match="No space left on device"):
        handle.wait()
    assert handle.done() and isinstance(handle.error(), OSError)
    assert manager.latest() == first and manager.list_checkpoints() == [first]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    monkeypatch.undo()
    # The error was given to wait(): the next save goes ahead.
    assert manager.save(3, model=model, trainer_state={}) == tmp_path / "step-00000003"


def test_an_error_nobody_waited_for_is_raised_by_the_next_save(tmp_path: Path) -> None:
    model = make_model()

    def fails(path: Path) -> None:
        if "step-00000001" in path.parent.name:
            raise OSError(errno.EACCES, "Permission denied", str(path))

    manager = CheckpointManager(tmp_path, write_hook=fails)
    manager.save(1, model=model, trainer_state={}, asynchronous=True)
    with pytest.raises(OSError, match="Permission denied"):
        manager.save(2, model=model, trainer_state={})
    assert manager.save(2, model=model, trainer_state={}) == tmp_path / "step-00000002"


def test_bad_input_to_an_async_save_fails_at_once(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="not JSON-serializable"):
        manager.save(1, model=make_model(), trainer_state={"x": object()}, asynchronous=True)
    assert manager.in_flight is None and not tmp_path.joinpath("step-00000001").exists()


def test_checkpoints_written_before_one_pass_hashing_verify_and_load(tmp_path: Path) -> None:
    # Written by gearshift 0.1.0, which hashed files by reading them back: same manifest v1.
    legacy = tmp_path / "checkpoints" / LEGACY.name
    shutil.copytree(LEGACY, legacy)
    assert verify_checkpoint(legacy) == []
    torch.manual_seed(0)  # the recipe that wrote it
    recipe = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    recipe_opt = torch.optim.AdamW(recipe.parameters(), lr=1e-2)
    for _ in range(3):
        recipe(torch.randn(5, 4)).pow(2).mean().backward()
        recipe_opt.step()
        recipe_opt.zero_grad()
    fresh = make_model(7)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.find_latest_valid() == (legacy, [])
    loaded = manager.load(legacy, model=fresh, optimizer=fresh_opt)
    assert loaded.step == 3 and loaded.extra == {"extra": {"a": 1}}
    assert torch.equal(loaded.tensors["signs"]["ema"], torch.arange(6, dtype=torch.float32))
    for name, value in recipe.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # Today's writer produces the same bytes for the same state.
    again = CheckpointManager(tmp_path / "again").save(
        3, model=recipe, optimizer=recipe_opt, trainer_state=loaded.trainer_state,
        extra_json=loaded.extra, extra_tensors=loaded.tensors)
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json",
                 "signs.safetensors", "trainer_state.json", "extra.json"):
        assert (again / name).read_bytes() == (legacy / name).read_bytes(), name
