"""The chat fine-tuning stage (task sft, LoRA with alpha phases) from a pretrained stage:
artifacts, metrics, both hand-off forms (merged, adapter), errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_support import chat_config, pretrain_stage, sft_stage

from gearshift import rundir
from gearshift.errors import ConfigError
from gearshift.models import validate_model_dir
from gearshift.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def test_sft_stage_trains_lora_with_phases_and_hands_on_merged_or_adapter(
        tmp_path: Path, corpus_file: Path) -> None:
    spec = {"name": "chat", "output_dir": str(tmp_path / "out"), "stages": [
        pretrain_stage(corpus_file), sft_stage(),
        {"name": "more", "from": "sft", "handoff": "adapter",
         "config": chat_config("more", training={"max_steps": 2, "eval_every": None})},
        {"name": "full", "from": "sft",
         "config": chat_config("full", training={"max_steps": 2, "eval_every": None})}]}
    result = run_pipeline(spec)
    assert result.state == "finished"
    root = result.pipeline_dir
    sft = root / "stages" / "1-sft"
    pretrained = root / "stages" / "0-pretrain" / "final"

    # final/ is an adapter on the pretrained stage's model.
    report = validate_model_dir(sft / "final", load=True)
    assert (report.kind, report.ok) == ("adapter", True)
    assert report.base.resolve() == pretrained.resolve()
    # Metrics: finite loss every step, exact match at each evaluation, the phases' alpha.
    metrics = rundir.read_metrics(sft)
    assert all(math.isfinite(v) for _, v in rundir.metric_series(metrics, "loss"))
    assert [s for s, _ in rundir.metric_series(metrics, "eval/exact_match")] == [0, 4, 8]
    transitions = rundir.read_events(sft, "phase_transition")
    assert [(e.fields["to_phase"], e.fields["to_alpha"]) for e in transitions] == [
        ("emphasis", 8.0)]
    assert 2 <= transitions[0].step <= 4
    alphas = dict(rundir.metric_series(metrics, "alpha/linear"))
    assert alphas[1] == 4.0 and alphas[8] == 8.0
    assert len([json.loads(x) for x in (sft / "samples.jsonl").open()]) == 3 * 2

    # handoff: adapter -> the next stage continued the very adapter (same base, same r).
    more = yaml.safe_load((root / "stages" / "2-more" / "config.yaml").read_text())
    assert more["model"]["path"] == str((sft / "final").resolve())
    more_final = json.loads((root / "stages/2-more/final/adapter_config.json").read_text())
    assert Path(more_final["base_model_name_or_path"]).resolve() == pretrained.resolve()
    assert more_final["r"] == 4
    # handoff: full -> the adapter merged into its base gives the same logits as base+adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = root / "handoff" / "3-full"
    assert validate_model_dir(merged_dir, load=True).kind == "full"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, sft / "final").eval()  # wraps base
        got, expected = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - plain).abs().max() > 1e-3  # the adapter changed the model
    full_cfg = yaml.safe_load((root / "stages" / "3-full" / "config.yaml").read_text())
    assert full_cfg["model"]["path"] == str(merged_dir.resolve())


def test_bad_chat_data_is_named_by_file_and_line(tmp_path: Path, cli,
                                                 corpus_file: Path) -> None:
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="},
                                            {"role": "assistant", "content": "2"}]}) +
                   "\n{\"messages\": 3}\n")
    stage = sft_stage()
    stage["config"]["data"] = {"source": "jsonl", "paths": [str(bad)], "seq_len": 96}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "chat", "output_dir": str(tmp_path / "out"),
                                    "stages": [pretrain_stage(corpus_file), stage]}))
    code, out, err = cli("pipeline", "run", str(path))
    assert code == 2 and "Traceback" not in err
    assert "stage sft failed" in err and f"{bad}:2" in err
    (root,) = (tmp_path / "out").iterdir()
    states = [s["state"] for s in json.loads((root / "status.json").read_text())["stages"]]
    assert states == ["finished", "failed"]


def test_an_invalid_model_directory_to_start_from_is_a_config_error(tmp_path: Path) -> None:
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError) as err:
        run_pipeline({"name": "chat", "output_dir": str(tmp_path / "out"),
                      "stages": [{**sft_stage(str(half))}]})
    text = str(err.value)
    assert f"stage sft: from: {half}: no weights" in text
    assert "no tokenizer" in text
    assert not (tmp_path / "out").exists()
