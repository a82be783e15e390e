"""Pipelines across stages: validation of every stage at once, the hand-off manifest, a corrupted
hand-off, a failing stage stopping the chain, status, report, and SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_support import (
    chat_config,
    pretrain_stage,
    qat_stage,
    sft_stage,
    sha256_tree,
    three_stages,
)

from gearshift.pipeline import PipelineError, resume_pipeline, run_pipeline

pytestmark = pytest.mark.slow


def status_of(pipeline_dir: Path) -> dict:
    return json.loads((pipeline_dir / "status.json").read_text())


def only_pipeline(parent: Path) -> Path:
    (found,) = [p for p in parent.iterdir() if p.is_dir()]
    return found


def test_every_problem_of_every_stage_at_once_exit_2_nothing_created(tmp_path: Path, cli,
                                                                     corpus_file: Path) -> None:
    spec = three_stages(corpus_file, tmp_path / "out")
    spec["stages"][0]["config"]["training"]["max_stepz"] = 5
    spec["stages"][1]["config"]["lora"]["r"] = 0
    spec["stages"][2]["from"] = "sfft"
    spec["stages"].append({"name": "extra", "config": "no/such/file.yaml", "form": "qat"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("pipeline", "run", str(path), "--set", "nosuch.training.max_steps=3")
    assert code == 2
    assert "Traceback" not in err
    assert "stage extra: form: unknown key (did you mean 'from'?)" in err
    # The pipeline-level problem stops before the stages are read; fix it and see the rest.
    del spec["stages"][3]["form"]
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("pipeline", "run", str(path), "--set", "nosuch.training.max_steps=3")
    assert code == 2 and "Traceback" not in err
    assert "stage pretrain: training.max_stepz: unknown key (did you mean 'max_steps'?)" in err
    assert "stage sft: lora.r:" in err
    assert "stage qat: from: 'sfft' is neither an earlier stage (pretrain, sft) nor a model " \
           "directory (did you mean 'sft'?)" in err
    assert "stage extra: config file not found: no/such/file.yaml" in err
    assert "--set: 'nosuch.training.max_steps=3': no stage named 'nosuch'" in err
    assert "(5 problems)" in err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was created


def test_a_later_stage_named_in_from_and_a_bad_handoff_form_are_errors(
        tmp_path: Path, corpus_file: Path) -> None:
    from gearshift.errors import ConfigError

    spec = {"name": "x", "output_dir": str(tmp_path / "out"), "stages": [
        {**sft_stage("qat")}, pretrain_stage(corpus_file),
        {**qat_stage("pretrain"), "handoff": "adapter"}]}
    with pytest.raises(ConfigError) as err:
        run_pipeline(spec)
    text = str(err.value)
    assert "stage sft: from: 'qat' is a later stage (stage 2, this is stage 0)" in text
    assert not (tmp_path / "out").exists()
    spec["stages"] = spec["stages"][1:]
    with pytest.raises(ConfigError) as err:
        run_pipeline(spec)
    assert "stage qat: handoff: adapter, but stage pretrain trains no LoRA adapter" in \
        str(err.value)


def test_three_stages_hand_off_checked_models_and_report(tmp_path: Path, cli,
                                                         corpus_file: Path) -> None:
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(three_stages(corpus_file, tmp_path / "out")))
    code, out, err = cli("pipeline", "run", str(path), "--set", "qat.training.max_steps=6")
    assert code == 0, err
    root = only_pipeline(tmp_path / "out")
    assert root.name.startswith("chain-")
    assert f"pipeline directory: {root}" in out
    assert {p.name for p in root.iterdir()} >= {"pipeline.yaml", "status.json", "stages",
                                                 "handoff", "report"}
    assert sorted(p.name for p in (root / "stages").iterdir()) == ["0-pretrain", "1-sft",
                                                                   "2-qat"]
    # pipeline.yaml holds every stage's resolved config, model.path set from `from:`.
    resolved = yaml.safe_load((root / "pipeline.yaml").read_text())
    qat_cfg = resolved["stages"][2]["config"]
    assert qat_cfg["training"]["max_steps"] == 6  # the --set reached its stage
    assert qat_cfg["model"]["path"] == str((root / "handoff" / "2-qat").resolve())
    assert resolved["stages"][1]["config"]["model"]["path"] == \
        str((root / "stages" / "0-pretrain" / "final").resolve())

    status = status_of(root)
    assert status["state"] == "finished"
    assert [s["state"] for s in status["stages"]] == ["finished"] * 3
    assert [s["steps"] for s in status["stages"]] == [8, 8, 6]
    assert [s["output"]["kind"] for s in status["stages"]] == ["full", "adapter", "full"]
    assert all(s["seconds"] > 0 for s in status["stages"])

    # sft was handed pretrain's final/ as it was when pretrain finished.
    sft_handoff = json.loads((root / "handoff" / "1-sft.json").read_text())
    final = root / "stages" / "0-pretrain" / "final"
    assert Path(sft_handoff["path"]).resolve() == final.resolve()
    assert sft_handoff["kind"] == "full" and sft_handoff["validation"]["ok"] is True
    assert sft_handoff["validation"]["tensors_checked"] > 0  # load=True read the headers
    assert {k: v["sha256"] for k, v in sft_handoff["manifest"].items()} == sha256_tree(final)
    # qat needs a full model: sft's adapter, merged into its base, with the tokenizer.
    qat_handoff = json.loads((root / "handoff" / "2-qat.json").read_text())
    merged = root / "handoff" / "2-qat"
    assert Path(qat_handoff["merged_from"]).resolve() == (root / "stages/1-sft/final").resolve()
    assert {k: v["sha256"] for k, v in qat_handoff["manifest"].items()} == sha256_tree(merged)
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    qat_run = yaml.safe_load((root / "stages/2-qat/config.yaml").read_text())
    assert qat_run["model"]["path"] == str(merged.resolve())

    # The report: a row per stage, the stages' curves, each stage's own report.
    summary = (root / "report" / "summary.md").read_text()
    for name, task in (("pretrain", "lm"), ("sft", "sft"), ("qat", "sft")):
        assert f"| {name} | {task} | finished |" in summary
        assert (root / "stages" / f"{['pretrain', 'sft', 'qat'].index(name)}-{name}" /
                "report" / "summary.md").is_file()
    assert (root / "report" / "stages.png").stat().st_size > 1000
    assert "MiB (full)" in summary and "MiB (adapter)" in summary

    code, out, err = cli("pipeline", "status", str(root), "--json")
    assert code == 0
    assert json.loads(out)["stages"][2]["output"]["kind"] == "full"
    code, out, err = cli("pipeline", "status", str(root))
    assert code == 0 and f"pipeline chain: finished ({root})" in out
    table = out.splitlines()[2:]
    assert [line.split()[1] for line in table] == ["pretrain", "sft", "qat"]
    assert all(line.split()[3] == "finished" for line in table)


def test_failing_stage_stops_the_chain_then_corrupted_handoffs_are_named(
        tmp_path: Path, cli, corpus_file: Path) -> None:
    data = tmp_path / "later.jsonl"  # written only after the first failure
    spec = three_stages(corpus_file, tmp_path / "out")
    spec["stages"][2]["config"]["data"] = {"source": "jsonl", "paths": [str(data)],
                                           "seq_len": 96, "eval_fraction": 0.2}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("pipeline", "run", str(path))
    assert code == 2 and "Traceback" not in err
    assert "stage qat failed, so the pipeline stopped" in err
    assert str(data) in err  # the reason: the data file
    root = only_pipeline(tmp_path / "out")
    status = status_of(root)
    assert (status["state"], status["failed_stage"]) == ("failed", "qat")
    assert [s["state"] for s in status["stages"]] == ["finished", "finished", "failed"]
    assert str(data) in status["stages"][2]["error"]
    code, out, err = cli("pipeline", "status", str(root))
    assert "stopped at stage qat" in out and "gearshift pipeline resume" in out

    # A finished stage's output changed on disk: named, with the file, before anything runs.
    weights = root / "stages" / "0-pretrain" / "final" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))
    code, out, err = cli("pipeline", "resume", str(root))
    assert code == 2 and "Traceback" not in err
    assert "stage pretrain: finished, but its output" in err
    assert "model.safetensors: sha256 differs" in err
    weights.write_bytes(original)

    # The merged model handed to qat changed: named with the stage that would load it.
    merged = root / "handoff" / "2-qat" / "config.json"
    good = merged.read_text()
    merged.write_text(good + "\n")
    code, out, err = cli("pipeline", "resume", str(root))
    assert code == 2
    assert "stage qat: the model it starts from" in err and "config.json: size is" in err
    merged.write_text(good)

    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}="},
                          {"role": "assistant", "content": str(a + b)}]}
            for a in range(6) for b in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli("pipeline", "resume", str(root), "--no-report")
    assert code == 0, err
    assert "stage pretrain: finished earlier, output verifies: skipped" in err
    assert "stage sft: finished earlier, output verifies: skipped" in err
    assert status_of(root)["state"] == "finished"
    assert (root / "stages" / "2-qat" / "final" / "model.safetensors").is_file()


def test_sigkill_at_any_moment_then_resume_gives_a_bit_identical_final_model(
        tmp_path: Path, corpus_file: Path) -> None:
    # Reference: the same pipeline without interruption.
    straight = run_pipeline(three_stages(corpus_file, tmp_path / "straight", "p"))
    assert straight.state == "finished"

    spec = three_stages(corpus_file, tmp_path / "killed", "p")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "gearshift", "pipeline", "run", str(path), "--no-report"]
    # Kill in the middle of stage sft (after its first checkpoint), then while qat trains.
    kills = ["stages/1-sft/checkpoints/step-00000004/manifest.json",
             "stages/2-qat/checkpoints/step-00000004/manifest.json"]
    root = tmp_path / "killed"  # the pipeline directory, once the first marker appears
    for i, marker in enumerate(kills):
        if i:
            cmd = [sys.executable, "-m", "gearshift", "pipeline", "resume", str(root),
                   "--no-report"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            found = list((tmp_path / "killed").glob(f"*/{marker}"))
            if found:
                root = found[0].parents[len(Path(marker).parts) - 1]
                break
            if proc.poll() is not None:
                pytest.fail(f"the pipeline ended before {marker}: {proc.stderr.read()}")
            time.sleep(0.01)
        else:
            pytest.fail(f"no {marker} in time")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert status_of(root)["state"] == "running"  # as the kill left it
    assert not (root / "stages" / "2-qat" / "final").exists()  # it really died mid-stage

    resumed = resume_pipeline(root)
    assert resumed.state == "finished"
    other = straight.pipeline_dir
    for stage in ("0-pretrain", "1-sft", "2-qat"):  # every weight file bit for bit
        assert sha256_tree(root / "stages" / stage / "final", root) == \
            sha256_tree(other / "stages" / stage / "final", other), stage
    assert sha256_tree(root / "handoff" / "2-qat") == sha256_tree(other / "handoff" / "2-qat")
    assert "model.safetensors" in sha256_tree(root / "stages" / "2-qat" / "final")
    events = [json.loads(x) for x in (root / "stages/2-qat/events.jsonl").open()]
    assert [e["event"] for e in events].count("resume") == 1


def test_resume_auto_continues_the_newest_pipeline_of_that_name(tmp_path: Path,
                                                                corpus_file: Path) -> None:
    spec = {"name": "auto", "output_dir": str(tmp_path / "out"),
            "stages": [pretrain_stage(corpus_file, max_steps=4),
                       {"name": "chat", "from": "pretrain",
                        "config": chat_config("chat", training={"max_steps": 2})}]}
    spec["stages"][1]["config"]["data"] = {"source": "jsonl", "paths": [str(tmp_path / "d")],
                                           "seq_len": 96}
    with pytest.raises(PipelineError):
        run_pipeline(spec)
    root = only_pipeline(tmp_path / "out")
    (tmp_path / "d").write_text(json.dumps({"messages": [
        {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}) + "\n")
    result = run_pipeline(spec, resume="auto")
    assert result.pipeline_dir == root and result.state == "finished"
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_a_pipeline_directory_that_is_not_one_is_a_clear_error(tmp_path: Path, cli) -> None:
    code, out, err = cli("pipeline", "resume", str(tmp_path))
    assert code == 2 and "status.json is missing" in err and "Traceback" not in err
    code, out, err = cli("pipeline", "status", str(tmp_path / "nope"))
    assert code == 2 and "is not a directory" in err
