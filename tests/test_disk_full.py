"""A full disk while checkpointing: the previous checkpoint stays intact and valid."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import gearshift as gs
from gearshift.checkpoint import CheckpointManager, verify_checkpoint


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 700 KB filesystem (tmpfs): room for about two checkpoints of the tiny model."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def run_on(small_disk: Path, make_config, on_error: str,
           asynchronous: bool = True) -> tuple[dict, Path]:
    # Asynchronous: the writer's error reaches the loop at a later step, with the same message.
    cfg = make_config(training={"max_steps": 10, "eval_every": None},
                      checkpoint={"every": 2, "keep_last": 10, "on_error": on_error,
                                  "async": asynchronous})
    cfg["output_dir"] = str(small_disk / "runs")
    return cfg, small_disk / "runs"


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_disk_full_stops_with_a_clear_message_and_keeps_the_last_checkpoint(
        small_disk: Path, make_config, asynchronous: bool) -> None:
    cfg, runs = run_on(small_disk, make_config, "stop", asynchronous)
    with pytest.raises(gs.CheckpointError) as info:
        gs.train(cfg)
    (run,) = runs.iterdir()
    message = str(info.value)
    assert "No space left on device" in message and f"gearshift resume {run}" in message
    manager = CheckpointManager(run / "checkpoints")
    kept = manager.list_checkpoints()
    assert kept, "no checkpoint fit at all: the disk is too small for this test"
    assert all(verify_checkpoint(p) == [] for p in kept)  # every one left is valid
    assert manager.latest() == kept[-1]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert f"the previous checkpoint {kept[-1].name} is intact" in message


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_disk_full_with_on_error_warn_keeps_training(small_disk: Path, make_config,
                                                     capsys: pytest.CaptureFixture[str],
                                                     asynchronous: bool) -> None:
    cfg, runs = run_on(small_disk, make_config, "warn", asynchronous)
    result = gs.train(cfg)
    assert result.step == 10
    err = capsys.readouterr().err
    assert "training goes on (checkpoint.on_error: warn)" in err
    manager = CheckpointManager(result.run_dir / "checkpoints")
    assert manager.list_checkpoints() and all(
        verify_checkpoint(p) == [] for p in manager.list_checkpoints())
    assert "could not write the checkpoint of step" in err and "No space left" in err
    # The disk is still full, so later records may be lost too; the run said so once.
    assert err.count("cannot write") <= 2
