"""The command line: every error path exits 2 with a clear message and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gearshift.cli.main import main


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gearshift", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "train", "--help")
    assert code == 0
    for flag in ("--learning-rate", "--max-steps", "--epochs", "--batch-size",
                 "--accumulate-grad-batches", "--scheduler", "--warmup-steps", "--warmup-ratio",
                 "--warmup-epochs", "--lr-min-ratio", "--grad-clip", "--grad-clip-algorithm",
                 "--precision", "--gradient-checkpointing", "--no-gradient-checkpointing",
                 "--seed", "--output-dir", "--checkpoint-every", "--keep-checkpoints",
                 "--disable-checkpointing", "--resume", "--set"):
        assert flag in out, flag
    code, out, _ = call(capsys, "--help")
    assert code == 0 and all(c in out for c in ("train", "resume", "config", "checkpoint",
                                                "model"))


def test_train_help_shows_value_placeholders_and_schedule_names(
        capsys: pytest.CaptureFixture[str]) -> None:
    from gearshift.schedules import ALIASES, SCHEDULES

    code, out, _ = call(capsys, "train", "--help")
    assert code == 0
    assert "FLAG:" not in out and "flag:" not in out
    for shown in ("--learning-rate LR", "--max-steps N", "--epochs N", "--batch-size N",
                  "--accumulate-grad-batches N", "--scheduler NAME", "--warmup-steps N",
                  "--warmup-ratio RATIO", "--warmup-epochs N", "--lr-min-ratio RATIO",
                  "--grad-clip MAX", "--grad-clip-algorithm {norm,value}",
                  "--precision {fp32,bf16,fp16}", "--seed N", "--output-dir DIR",
                  "--checkpoint-every N", "--keep-checkpoints N", "--resume {RUN_DIR,auto}",
                  "--set KEY.PATH=VALUE", "[CONFIG]"):
        assert shown in out, shown
    # argparse wraps help text: compare with the line breaks taken out.
    flat = " ".join(out.split())
    start = flat.index("--scheduler NAME LR schedule:")
    scheduler_help = flat[start:flat.index("--warmup-steps N", start)]
    assert {"constant", "warmup_cosine", "plateau"} <= set(SCHEDULES)
    for name in SCHEDULES:
        assert f" {name}," in scheduler_help or f" {name} (" in scheduler_help, name
    for alias, target in ALIASES.items():
        assert f"{alias} = {target}" in scheduler_help, alias
    code, out, _ = call(capsys, "config", "validate", "--help")
    assert code == 0 and "--max-steps N" in out and "FLAG:" not in out


def test_every_verb_is_a_module_with_its_parser_and_run() -> None:
    from gearshift.cli import (
        checkpoint,
        compare,
        config,
        daemon,
        launch,
        model,
        pipeline,
        profile,
        quantize,
        report,
        resume,
        train,
    )
    from gearshift.cli.main import VERBS, build_parser

    assert VERBS == {"train": train, "resume": resume, "report": report, "compare": compare,
                     "config": config, "checkpoint": checkpoint, "model": model,
                     "profile": profile, "quantize": quantize, "daemon": daemon,
                     "launch": launch, "pipeline": pipeline}
    parser = build_parser()
    for argv, verb in ((["train"], "train"), (["resume", "r"], "resume"),
                       (["config", "show"], "config"), (["checkpoint", "verify", "p"],
                                                        "checkpoint"),
                       (["model", "validate", "d"], "model"), (["profile", "list"], "profile"),
                       (["quantize", "export", "s", "d"], "quantize")):
        args = parser.parse_args(argv)
        assert args.command == verb and callable(VERBS[args.command].run)
    assert set(checkpoint.ACTIONS) == {"inspect", "verify", "convert"}


def test_dispatch_reaches_each_verb(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # One cheap, observable outcome per verb: each comes from that verb's own run().
    assert call(capsys, "config", "validate")[:2] == (0, "embedded default: valid\n")
    code, out, _ = call(capsys, "config", "show", "--seed", "11")
    assert code == 0 and yaml.safe_load(out)["seed"] == 11
    code, _, err = call(capsys, "resume", str(tmp_path / "nope"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'nope'} is not a directory")
    code, _, err = call(capsys, "checkpoint", "verify", str(tmp_path / "nope"))
    assert (code, err) == (2, f"error: {tmp_path / 'nope'} does not exist\n")
    code, _, err = call(capsys, "checkpoint", "inspect", str(tmp_path / "nope"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'nope'} does not exist")
    code, _, err = call(capsys, "model", "validate", str(tmp_path))
    assert code == 2 and err.startswith(f"error: model directory {tmp_path} is not valid (1 "
                                        "problem):\n  - the directory is empty")
    code, out, _ = call(capsys)
    assert code == 2 and "COMMAND" in out


def test_config_show_applies_flags_and_sets(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  batch_size: 4\n", encoding="utf-8")
    code, out, _ = call(capsys, "config", "show", str(f), "--max-steps", "9",
                        "--no-gradient-checkpointing", "--disable-checkpointing",
                        "--scheduler", "Adaptive", "--set", "data.seq_len=64")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["training"]["batch_size"] == 4
    assert shown["training"]["max_steps"] == 9
    assert shown["training"]["gradient_checkpointing"] is False
    assert shown["checkpoint"]["enabled"] is False
    assert shown["schedule"]["name"] == "plateau"
    assert shown["data"]["seq_len"] == 64


def test_config_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "config", "validate")
    assert code == 0 and "valid" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["config", "validate", "--set", "training.max_step=5"],
         "training.max_step: unknown key (did you mean 'max_steps'?)"),
        (["config", "validate", "--learning-rate", "-1", "--lr-min-ratio", "2"],
         "optim.learning_rate"),
        (["config", "validate", "--scheduler", "cosinus"], "did you mean 'cosine'"),
        (["config", "validate", "--warmup-steps", "5", "--warmup-ratio", "0.1"],
         "two warmup forms"),
        (["config", "validate", "--accumulate-grad-batches", "0"],
         "training.accumulate_grad_batches"),
        (["config", "validate", "missing.yaml"], "config file not found: missing.yaml"),
        (["config", "validate", "--set", "nonsense"], "expected KEY.PATH=VALUE"),
        (["resume", "does/not/exist"], "is not a directory"),
        (["checkpoint", "verify", "does/not/exist"], "does not exist"),
    ],
)
def test_error_paths_exit_2(capsys: pytest.CaptureFixture[str], args: list[str],
                            expected: str) -> None:
    code, _, err = call(capsys, *args)
    assert code == 2
    assert expected in err
    assert err.startswith("error: ")


def test_all_config_problems_one_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = call(capsys, "config", "validate", "--learning-rate", "-1", "--lr-min-ratio",
                        "2", "--set", "training.bogus=1")
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("  - ")]
    assert len(lines) == 3
    assert any(x.startswith("  - optim.learning_rate:") for x in lines)
    assert any(x.startswith("  - schedule.min_lr_ratio:") for x in lines)
    assert any(x.startswith("  - training.bogus:") for x in lines)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--max-steps", "abc"], "invalid int value: 'abc'"),
        (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str],
                                expected: str) -> None:
    code, _, err = call(capsys, *args)
    assert code == 2 and expected in err


def test_subprocess_errors_have_no_traceback(tmp_path: Path) -> None:
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "fine"}\n{"txt": "oops"}\n', encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": "jsonl", "paths": [str(bad_data)]},
                                   "output_dir": str(tmp_path / "runs")}), encoding="utf-8")
    cases = [
        (["train", str(cfg)], f"{bad_data}:2: missing field 'text'"),
        (["train", "--set", "trainingg.max_steps=1"], "did you mean 'training'"),
        (["resume", str(tmp_path)], "has no config.yaml"),
        (["train", "--resume", str(tmp_path), "--max-steps", "2"], "not a run directory"),
    ]
    for args, expected in cases:
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, args


def test_resume_without_checkpoints_exit_2(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("training:\n  max_steps: 3\n", encoding="utf-8")
    code, _, err = call(capsys, "resume", str(run))
    assert code == 2 and "no valid checkpoint" in err


def test_checkpoint_verify(capsys: pytest.CaptureFixture[str], make_config) -> None:
    import gearshift as gs

    result = gs.train(make_config(training={"max_steps": 4}, checkpoint={"every": 2}))
    code, out, _ = call(capsys, "checkpoint", "verify", str(result.run_dir))
    assert code == 0 and out.count(": ok") == 2
    target = result.run_dir / "checkpoints" / "step-00000002" / "optimizer.json"
    target.write_text(json.dumps({"tampered": True}), encoding="utf-8")
    code, out, _ = call(capsys, "checkpoint", "verify", str(result.run_dir))
    assert code == 1
    assert "step-00000002: CORRUPT" in out and "optimizer.json" in out
    assert "step-00000004: ok" in out


def test_resume_with_an_empty_run_config_is_refused(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("", encoding="utf-8")
    code, _, err = call(capsys, "resume", str(run))
    assert code == 2 and "config.yaml is empty" in err
