"""The pretraining stage (task lm) run as a pipeline stage: artifacts, metrics, hand-off, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_support import chat_config, pretrain_stage

import gearshift as gs
from gearshift import rundir
from gearshift.models import validate_model_dir
from gearshift.pipeline import PipelineError, run_pipeline

pytestmark = pytest.mark.slow


def test_pretrain_stage_exports_a_valid_chat_ready_model(tmp_path: Path,
                                                         corpus_file: Path) -> None:
    result = run_pipeline({"name": "pre", "output_dir": str(tmp_path / "out"),
                           "stages": [pretrain_stage(corpus_file)]})
    assert result.state == "finished"
    run_dir = result.pipeline_dir / "stages" / "0-pretrain"
    assert result.final_dir == run_dir / "final"
    names = {p.name for p in run_dir.iterdir()}
    assert names >= {"config.yaml", "overrides.json", "metrics.jsonl", "events.jsonl",
                     "checkpoints", "final"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step-00000004", "step-00000008"]
    report = validate_model_dir(result.final_dir, load=True)
    assert (report.kind, report.ok) == ("full", True) and report.tensors > 0

    metrics = rundir.read_metrics(run_dir)
    losses = rundir.metric_series(metrics, "loss")
    assert [s for s, _ in losses] == list(range(1, 9))
    assert all(math.isfinite(v) for _, v in losses)
    evals = rundir.metric_series(metrics, "eval/loss")
    assert [s for s, _ in evals] == [0, 4, 8] and evals[-1][1] < evals[0][1]
    status = json.loads((result.pipeline_dir / "status.json").read_text())["stages"][0]
    assert status["metrics"]["eval/loss"] == pytest.approx(evals[-1][1])
    assert status["output"]["bytes"] == sum(p.stat().st_size for p in
                                            result.final_dir.rglob("*") if p.is_file())

    # Its output loads in the next stage: a chat run starts from it (its tokenizer carries the
    # chat template) and the weights it starts from are the stage's.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert "generation" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    saved = load_file(result.final_dir / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)
    nxt = gs.train({**chat_config("next", training={"max_steps": 2, "eval_every": None}),
                    "model": {"path": str(result.final_dir), "tokenizer": "auto"},
                    "output_dir": str(tmp_path / "runs")})
    assert nxt.step == 2 and (nxt.run_dir / "final" / "model.safetensors").is_file()


def test_bad_data_fails_the_stage_with_a_clear_error(tmp_path: Path, cli,
                                                     corpus_file: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    stage = pretrain_stage(corpus_file)
    stage["config"]["data"] = {"source": "jsonl", "paths": [str(bad)], "seq_len": 32}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "pre", "output_dir": str(tmp_path / "out"),
                                    "stages": [stage]}))
    code, out, err = cli("pipeline", "run", str(path))
    assert code == 2 and "Traceback" not in err
    assert "stage pretrain failed" in err and f"{bad}:2" in err
    (root,) = (tmp_path / "out").iterdir()
    status = json.loads((root / "status.json").read_text())
    assert status["state"] == "failed" and f"{bad}:2" in status["stages"][0]["error"]


def test_a_bad_model_directory_to_start_from_is_named_before_anything_runs(
        tmp_path: Path, corpus_file: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    stage = {**pretrain_stage(corpus_file), "from": str(broken)}
    with pytest.raises(gs.ConfigError) as err:
        run_pipeline({"name": "pre", "output_dir": str(tmp_path / "out"), "stages": [stage]})
    text = str(err.value)
    assert f"stage pretrain: from: {broken}: config.json is not valid JSON" in text
    assert "no weights" in text
    assert not (tmp_path / "out").exists()


def test_a_stage_error_is_a_pipeline_error_with_the_stage_named(tmp_path: Path,
                                                                corpus_file: Path) -> None:
    stage = pretrain_stage(corpus_file)
    stage["config"]["data"]["paths"] = [str(tmp_path / "missing.txt")]
    with pytest.raises(PipelineError) as err:
        run_pipeline({"name": "pre", "output_dir": str(tmp_path / "out"), "stages": [stage]})
    assert err.value.exit_code == 2
    assert "stage pretrain failed" in str(err.value) and "missing.txt" in str(err.value)
