"""``memory/peak_mb``: the peak memory of every logged step and of the whole run."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

import gearshift as gs
from gearshift.train.memory import process_peak_rss_mb


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


def test_every_logged_step_has_the_peak_and_the_run_reports_its_peak(make_config) -> None:
    result = gs.train(make_config(training={"max_steps": 6, "log_every": 2, "eval_every": None}))
    train = [m for m in lines(result.run_dir / "metrics.jsonl") if "loss" in m]
    peaks = [m["memory/peak_mb"] for m in train]
    assert [m["step"] for m in train] == [2, 4, 6] and len(peaks) == 3
    # CPU: the process's peak RSS (Linux reports KiB): torch alone takes well over 50 MiB.
    rss_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert all(50 < p <= rss_now for p in peaks)
    assert peaks == sorted(peaks)  # a peak never falls
    end = [e for e in lines(result.run_dir / "events.jsonl") if e["event"] == "end"]
    assert end[0]["memory/peak_mb"] == result.metrics["memory/peak_mb"]
    assert peaks[-1] <= result.metrics["memory/peak_mb"] <= process_peak_rss_mb()


def test_the_run_peak_counts_the_processes_before_a_resume(make_config) -> None:
    class Crash(RuntimeError):
        pass

    class CrashAt(gs.Callback):
        def on_checkpoint(self, trainer: gs.Trainer, path: Path) -> None:
            if path.name == "step-00000004":  # committed (asynchronous saves commit later)
                raise Crash(str(trainer.run_dir))

    cfg = make_config(training={"max_steps": 8, "log_every": 2, "eval_every": None})
    with pytest.raises(Crash) as info:
        gs.train(cfg, callbacks=[CrashAt()])
    run = Path(str(info.value))
    # As if the process before the crash had used far more memory than this one.
    records = lines(run / "metrics.jsonl")
    first_step = next(r for r in records if "loss" in r)
    first_step["memory/peak_mb"] = 123456.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = gs.train(cfg, resume=run)
    assert result.metrics["memory/peak_mb"] == 123456.0
    assert [e["memory/peak_mb"] for e in lines(run / "events.jsonl") if e["event"] == "end"] \
        == [123456.0]


def test_the_cli_summary_prints_the_peak(make_config, tmp_path: Path, cli) -> None:
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(make_config(training={"max_steps": 2, "eval_every": None},
                                              schedule={"warmup_steps": 0})))
    code, out, _ = cli("train", str(cfg))
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("peak memory: ")]
    assert line.endswith(" MiB") and float(line.split()[2].replace(",", "")) > 50
