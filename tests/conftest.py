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
