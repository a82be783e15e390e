"""The BitNet b1.58 QAT stage from a full model handed over by an earlier stage: the packed
export, its quantization metrics, loading it, and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pipeline_support import pretrain_stage, qat_stage

from gearshift import rundir
from gearshift.errors import ConfigError
from gearshift.models import validate_model_dir
from gearshift.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def test_qat_stage_exports_a_packed_ternary_model_that_loads(tmp_path: Path,
                                                             corpus_file: Path) -> None:
    result = run_pipeline({"name": "q", "output_dir": str(tmp_path / "out"), "stages": [
        pretrain_stage(corpus_file), qat_stage("pretrain")]})
    assert result.state == "finished"
    run_dir = result.pipeline_dir / "stages" / "1-qat"
    final = result.final_dir
    assert final == run_dir / "final"
    report = validate_model_dir(final, load=True)
    assert (report.kind, report.ok) == ("full", True)
    config = json.loads((final / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"

    metrics = rundir.read_metrics(run_dir)
    assert rundir.metric_series(metrics, "quant/lambda")[:3] == [(1, 0.5), (2, 1.0), (3, 1.0)]
    zeros = rundir.metric_series(metrics, "quant/zero_fraction")
    assert [s for s, _ in zeros] == [0, 4, 8] and all(0.0 < v < 1.0 for _, v in zeros)
    assert all(math.isfinite(v) for _, v in rundir.metric_series(metrics, "loss"))
    assert [s for s, _ in rundir.metric_series(metrics, "eval/exact_match")] == [0, 4, 8]

    # The packed model loads with plain transformers and generates.
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.uint8
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "1+2="}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    # The stage's size on disk is recorded for the report.
    status = json.loads((result.pipeline_dir / "status.json").read_text())
    assert status["stages"][1]["output"]["bytes"] == sum(
        p.stat().st_size for p in final.rglob("*") if p.is_file())


def test_qat_from_a_corrupt_model_directory_is_named_before_anything_runs(
        tmp_path: Path, corpus_file: Path) -> None:
    first = run_pipeline({"name": "p", "output_dir": str(tmp_path / "a"),
                          "stages": [pretrain_stage(corpus_file, max_steps=3)]})
    weights = first.final_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: the header no longer parses
    with pytest.raises(ConfigError) as err:
        run_pipeline({"name": "q", "output_dir": str(tmp_path / "out"),
                      "stages": [qat_stage(str(first.final_dir))]})
    assert f"stage qat: from: {first.final_dir}: " in str(err.value)
    assert "model.safetensors" in str(err.value)
    assert not (tmp_path / "out").exists()
