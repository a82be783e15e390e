"""Model directories: ``validate_model_dir`` and ``gearshift model validate``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gearshift.errors import ModelError
from gearshift.models import validate_model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny real Llama saved whole and sharded (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32))
    whole, sharded = root / "whole", root / "sharded"
    model.save_pretrained(str(whole))
    model.save_pretrained(str(sharded), max_shard_size="4KB")
    return whole, sharded


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model-*.safetensors"))


def test_complete_directories_are_valid(model_dirs: tuple[Path, Path]) -> None:
    whole, sharded = model_dirs
    assert len(_shards(sharded)) >= 3
    assert validate_model_dir(whole) is None
    assert validate_model_dir(str(sharded)) is None


def test_everything_missing_is_listed_at_once(model_dirs: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    _, sharded = model_dirs
    d = _copy(sharded, tmp_path / "d")
    gone = _shards(d)[::2]
    for name in ["config.json", *gone]:
        (d / name).unlink()
    with pytest.raises(ModelError) as info:
        validate_model_dir(d)
    listed = ", ".join(f"shard {s} (listed in model.safetensors.index.json)" for s in gone)
    assert str(info.value) == f"model directory {d} is missing: config.json, {listed}"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError) as info:
        validate_model_dir(empty)
    assert str(info.value) == (f"model directory {empty} is missing: config.json, weights "
                               "(model.safetensors or a sharded index)")


@pytest.mark.parametrize("index", ["{", "[1]", '{"weight_map": [1]}',
                                   '{"weight_map": {"a": 3}}'])
def test_a_bad_shard_index_is_named(model_dirs: tuple[Path, Path], tmp_path: Path,
                                    index: str) -> None:
    d = _copy(model_dirs[1], tmp_path / "d")
    (d / "model.safetensors.index.json").write_text(index, encoding="utf-8")
    with pytest.raises(ModelError) as info:
        validate_model_dir(d)
    assert str(info.value).startswith(f"{d / 'model.safetensors.index.json'} is not a valid "
                                      "shard index")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        validate_model_dir(tmp_path / "absent")
    assert str(info.value) == f"model.path {tmp_path / 'absent'} is not a directory"


def test_model_validate_command(model_dirs: tuple[Path, Path], tmp_path: Path, cli) -> None:
    whole, sharded = model_dirs
    for d in (whole, sharded):
        assert cli("model", "validate", str(d)) == (
            0, f"{d}: valid model directory\n", "")
    broken = _copy(sharded, tmp_path / "broken")
    (broken / _shards(broken)[0]).unlink()
    code, out, err = cli("model", "validate", str(broken))
    assert (code, out) == (2, "")
    assert err == (f"error: model directory {broken} is missing: shard {_shards(sharded)[0]} "
                   "(listed in model.safetensors.index.json)\n")
    code, _, err = cli("model", "validate", str(tmp_path / "absent"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'absent'} is not a directory")
    code, _, err = cli("model")
    assert code == 2 and "the following arguments are required: ACTION" in err


def test_model_validate_has_no_traceback(model_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    d = _copy(model_dirs[0], tmp_path / "d")
    (d / "config.json").write_text(json.dumps({}), encoding="utf-8")
    (d / "model.safetensors").unlink()
    proc = subprocess.run([sys.executable, "-m", "gearshift", "model", "validate", str(d)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"error: model directory {d} is missing: weights (model.safetensors " \
                          "or a sharded index)\n"
