"""Kill-anywhere durability: ``bench/chaos.py`` reduced for CI, and regressions it found.

The chaos run trains the tiny job through the real command line, SIGKILLs it three times (two
kills the moment a checkpoint folder of the process appears, so they land while the checkpoint
is being written; one at a uniformly random moment of training), resumes with
``gearshift resume RUN_DIR`` each time, and compares the result with an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

import gearshift as gs
from gearshift.cli.main import main

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_chaos() -> ModuleType:
    if "chaos" in sys.modules:
        return sys.modules["chaos"]
    spec = importlib.util.spec_from_file_location("chaos", BENCH / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path: Path) -> None:
    chaos = load_chaos()
    summary = chaos.run_chaos(trials=1, kills=3, seed=1, steps=20, checkpoint_every=3,
                              keep_last=3, modes=["checkpoint", "training", "checkpoint"],
                              write_jitter=0.0, workdir=tmp_path, log=print)
    chaos.print_report(summary)
    (trial,) = summary["results"]
    assert summary["finished"] == 1, trial["errors"]
    assert summary["errors"] == 0, trial["errors"]
    assert summary["kills"] == 3 and summary["kills_by_mode"]["checkpoint"] == 2
    # Killed the instant a .tmp-step-* folder of the process appeared, the kill lands before the
    # checkpoint (hundreds of KB, several fsyncs) is complete.
    assert summary["kills_mid_checkpoint_write"] >= 1, trial["kills"]
    assert summary["resumes"] + summary["restarts"] == 3
    # every resume was checked: it loaded the newest checkpoint that verified after the kill
    assert summary["resume_events_checked"] >= summary["resumes"]
    assert summary["wrong_resume"] == 0, trial["wrong_resume"]
    assert summary["corrupt_loaded"] == 0, trial["corrupt_loaded"]
    assert trial["leftovers_at_end"] == []  # the last save cleaned what the kills left

    reference = chaos.find_run(tmp_path / "reference")
    victim = Path(trial["run_dir"])
    assert trial["mismatches"] == []  # bit-identical weights; every step's loss, lr, grad_norm
    assert chaos.history(victim) == chaos.history(reference)
    assert chaos.eval_history(victim) == chaos.eval_history(reference)


def test_resuming_the_final_checkpoint_logs_the_final_eval_once(make_config) -> None:
    # Found by the chaos run: a kill during the final export left the final eval logged twice.
    chaos = load_chaos()
    cfg = make_config(training={"max_steps": 6, "eval_every": 3}, checkpoint={"every": 3})
    done = gs.train(cfg)
    before = chaos.eval_history(done.run_dir)
    assert before[-1][0] == 6
    # The state a kill during the final export leaves: checkpoint 6 complete, final eval logged.
    again = gs.train(cfg, resume=done.run_dir)
    assert again.step == 6
    assert chaos.eval_history(done.run_dir) == before


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler sees it."""


def test_kill_while_resume_rewrites_config_keeps_the_run_resumable(
        make_config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Every resume rewrites RUN_DIR/config.yaml. Die at the worst moment of that rewrite: after
    # an in-place write truncated the file, or just before an atomic rename would swap it in.
    cfg = make_config(training={"max_steps": 6, "eval_every": None}, checkpoint={"every": 3})
    run_dir = gs.train(cfg).run_dir
    real_write_text, real_replace = Path.write_text, os.replace

    def dies_after_truncating(self: Path, data: str, *args, **kwargs) -> int:
        if self.name == "config.yaml":
            real_write_text(self, "", *args, **kwargs)  # open(..., "w") truncated it
            raise Killed
        return real_write_text(self, data, *args, **kwargs)

    def dies_before_renaming(src, dst, *args, **kwargs) -> None:
        if Path(dst).name == "config.yaml":
            raise Killed
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dies_after_truncating)
    monkeypatch.setattr(os, "replace", dies_before_renaming)
    with pytest.raises(Killed):
        main(["resume", str(run_dir)])
    monkeypatch.undo()
    capsys.readouterr()
    code = main(["resume", str(run_dir)])
    _, err = capsys.readouterr()
    assert code == 0, err
    events = [json.loads(x) for x in (run_dir / "events.jsonl").open()]
    assert events[-1]["event"] == "end" and events[-1]["step"] == 6


def test_empty_run_config_is_refused_clearly(make_config,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # What a power cut after a non-atomic rewrite could leave: no silent fallback to defaults.
    cfg = make_config(training={"max_steps": 6, "eval_every": None}, checkpoint={"every": 3})
    run_dir = gs.train(cfg).run_dir
    (run_dir / "config.yaml").write_text("", encoding="utf-8")
    capsys.readouterr()  # what the training run printed is not the resume's answer
    code = main(["resume", str(run_dir)])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and "config.yaml is empty" in err
