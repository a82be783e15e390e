"""Shared fixtures: tiny real models and a small real corpus (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """About 24 KB of the Python reference manual as one plain-text file."""
    from gearshift.data import pydoc_topics

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(pydoc_topics()[:40])[:24_000], encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, corpus: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for a ~30k-parameter Llama on a small corpus; sections override keys."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "seed": 7,
        "output_dir": str(tmp_path / "runs"),
        "model": {"build": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 64}},
        "data": {"source": "text", "paths": [str(corpus)], "seq_len": 32, "eval_fraction": 0.05},
        "optim": {"learning_rate": 3e-3},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 3},
        "training": {"max_steps": 12, "batch_size": 8, "eval_every": 6, "log_every": 1},
        "checkpoint": {"every": 4, "keep_last": 10},
        "logging": {"progress_bar": False, "tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


@pytest.fixture
def make_config(tmp_path: Path, corpus_file: Path):
    def factory(**sections: dict[str, Any]) -> dict[str, Any]:
        return tiny_config(tmp_path, corpus_file, **sections)

    return factory


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``gearshift ARGS…`` in this process: ``cli(*args) -> (exit code, stdout, stderr)``."""
    from gearshift.cli.main import main

    def call(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's --help and usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return call


def kill_at_checkpoint(cfg: dict[str, Any], step: int, config_path: Path) -> Path:
    """Run ``gs.train(cfg)`` in a child process, SIGKILL it once the checkpoint of ``step`` is
    committed, and return the run directory (checked to have no ``final/``)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    config_path.write_text(json.dumps(cfg))
    # A callback that only sleeps gives the kill time to land mid-run.
    code = ("import json, time, gearshift as gs\n"
            "class Slow(gs.Callback):\n"
            "    def on_step_end(self, trainer, metrics): time.sleep(0.05)\n"
            f"gs.train(json.load(open({str(config_path)!r})), callbacks=[Slow()])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    pattern = f"*/checkpoints/step-{step:08d}/manifest.json"
    deadline, run_dir = time.time() + 300, None
    while time.time() < deadline and run_dir is None:
        found = list(Path(cfg["output_dir"]).glob(pattern))
        run_dir = found[0].parents[2] if found else None
        if run_dir is None and proc.poll() is not None:
            pytest.fail(f"the run ended before its step-{step} checkpoint: {proc.stderr.read()}")
        time.sleep(0.01)
    assert run_dir is not None, f"no step-{step} checkpoint in time"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "final").exists()  # it really died mid-run
    return run_dir
