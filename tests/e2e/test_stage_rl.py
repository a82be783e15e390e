"""The REINFORCE stage (task reinforce) from a merged chat model: artifacts, reward metrics,
its output loading in the next stage (QAT), and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pipeline_support import chat_config, pretrain_stage, qat_stage, sft_stage  # noqa: E402

from gearshift import rundir  # noqa: E402
from gearshift.errors import ConfigError  # noqa: E402
from gearshift.models import validate_model_dir  # noqa: E402
from gearshift.pipeline import run_pipeline  # noqa: E402

pytestmark = pytest.mark.slow

#: The pinned ``rl:`` keys, small.
RL = {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 3, "temperature": 1.0,
      "top_p": 1.0, "reward": {"name": "exact_match"}, "baseline": "leave_one_out",
      "normalize_advantages": True, "entropy_coefficient": 0.01, "entropy_decay": 0.995,
      "kl_coefficient": 0.0, "validation_every": 2, "patience": 10, "keep": "best"}


def rl_stage(source: str = "sft", **rl: object) -> dict:
    cfg = chat_config("rl", training={"max_steps": 4, "eval_every": 2})
    cfg["task"] = "reinforce"
    cfg["rl"] = {**RL, **rl}
    cfg["optim"] = {"learning_rate": 1e-4}
    return {"name": "rl", "from": source, "config": cfg}


def test_rl_stage_improves_on_the_merged_sft_model_and_hands_on_a_full_model(
        tmp_path: Path, corpus_file: Path) -> None:
    result = run_pipeline({"name": "rl", "output_dir": str(tmp_path / "out"), "stages": [
        pretrain_stage(corpus_file), sft_stage(), rl_stage(), qat_stage("rl")]})
    assert result.state == "finished"
    root = result.pipeline_dir
    run_dir = root / "stages" / "2-rl"
    # It started from the SFT adapter merged into its base (a full model).
    handoff = json.loads((root / "handoff" / "2-rl.json").read_text())
    assert handoff["kind"] == "full" and handoff["merged_from"].endswith("1-sft/final")
    report = validate_model_dir(run_dir / "final", load=True)
    assert (report.kind, report.ok) == ("full", True)
    metrics = rundir.read_metrics(run_dir)
    names = {k for r in metrics for k in r.values}
    rewards = [k for k in names if "reward" in k]
    assert rewards, f"no reward metric among {sorted(names)}"
    for key in rewards:
        assert all(math.isfinite(v) for _, v in rundir.metric_series(metrics, key))
    assert all(math.isfinite(v) for _, v in rundir.metric_series(metrics, "loss"))
    # Its output loads in the next stage: QAT trained from it.
    qat = yaml_config(root / "stages" / "3-qat")
    assert qat["model"]["path"] == str((run_dir / "final").resolve())
    assert validate_model_dir(root / "stages" / "3-qat" / "final", load=True).ok


def test_rl_config_errors_are_prefixed_with_the_stage(tmp_path: Path,
                                                      corpus_file: Path) -> None:
    stage = rl_stage(prompts_per_step=0, baseline="nope")
    stage["config"]["rl"]["samples_per_promt"] = 2
    with pytest.raises(ConfigError) as err:
        run_pipeline({"name": "rl", "output_dir": str(tmp_path / "out"), "stages": [
            pretrain_stage(corpus_file), sft_stage(), stage]})
    text = str(err.value)
    assert "stage rl: rl.prompts_per_step" in text
    assert "stage rl: rl.baseline" in text
    assert "stage rl: rl.samples_per_promt: unknown key" in text
    assert not (tmp_path / "out").exists()


def test_rl_from_a_directory_that_is_no_model_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        run_pipeline({"name": "rl", "output_dir": str(tmp_path / "out"),
                      "stages": [rl_stage(str(empty))]})
    assert f"stage rl: from: {empty}: the directory is empty" in str(err.value)


def yaml_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())
