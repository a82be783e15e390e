"""Config: precedence, audit, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gearshift.config import Config, build_layers, load_config, parse_set_overrides, resolve
from gearshift.errors import ConfigError


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_are_the_embedded_recipe() -> None:
    cfg = load_config(None)
    assert cfg.data.source == "pydoc_topics"
    assert cfg.schedule.name == "warmup_cosine"
    assert cfg.model.path is None and cfg.model.build.architecture == "llama"


def test_precedence_defaults_file_flags_set(tmp_path: Path) -> None:
    f = write_yaml(tmp_path / "c.yaml", {"optim": {"learning_rate": 0.01, "weight_decay": 0.1},
                                         "training": {"max_steps": 50, "batch_size": 4}})
    flags = {"training.max_steps": ("--max-steps", 70), "optim.learning_rate":
             ("--learning-rate", 0.02)}
    resolved = resolve(build_layers(f, ["training.max_steps=90", "seed=3"], flags))
    cfg = resolved.config
    assert cfg.training.max_steps == 90        # --set beats the flag and the file
    assert cfg.optim.learning_rate == 0.02     # the flag beats the file
    assert cfg.optim.weight_decay == 0.1       # the file beats the default
    assert cfg.training.batch_size == 4
    assert cfg.training.epochs == Config().training.epochs  # untouched default
    audit = resolved.audit
    assert audit["training.max_steps"] == {"value": 90, "default": None,
                                           "source": "--set training.max_steps=90"}
    assert audit["optim.learning_rate"]["source"] == "flag --learning-rate"
    assert audit["optim.weight_decay"]["source"] == f"file {f}"
    assert audit["seed"]["value"] == 3
    assert "training.epochs" not in audit      # only non-default values are recorded


def test_set_values_are_parsed_as_yaml() -> None:
    cfg = load_config(None, ["training.grad_clip=null", "optim.betas=[0.8, 0.9]",
                             "schedule.options.num_cycles=3", "schedule.name=cosine_with_restarts",
                             "training.gradient_checkpointing=true"])
    assert cfg.training.grad_clip is None
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.schedule.options == {"num_cycles": 3}
    assert cfg.training.gradient_checkpointing is True


def test_mapping_overrides() -> None:
    assert load_config({"seed": 5}, {"training.max_steps": 20}).training.max_steps == 20


def test_every_problem_is_reported_at_once() -> None:
    bad = {
        "trainng": {"max_steps": 10},                      # unknown section, did-you-mean
        "training": {"max_step": 5, "batch_size": "big",   # unknown key, wrong type
                     "accumulate_grad_batches": 0, "max_steps": 10},
        "optim": {"learning_rate": -1.0},                  # negative
        "schedule": {"name": "cosinus", "min_lr_ratio": 1.5,
                     "warmup_steps": 20, "warmup_ratio": 0.1},
    }
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    by_path = {p.path: p.message for p in info.value.problems}
    assert "did you mean 'training'" in by_path["trainng"]
    assert "did you mean 'max_steps'" in by_path["training.max_step"]
    assert "valid keys here" in by_path["training.max_step"]
    assert "integer" in by_path["training.batch_size"] and "'big'" in by_path["training.batch_size"]
    assert "greater than or equal to 1" in by_path["training.accumulate_grad_batches"]
    assert "greater than 0" in by_path["optim.learning_rate"]
    assert "unknown schedule" in by_path["schedule.name"].lower()
    for name in ("warmup_cosine", "constant", "plateau", "warmup_stable_decay"):
        assert name in by_path["schedule.name"]
    assert "[0, 1]" in by_path["schedule.min_lr_ratio"]
    assert "two warmup forms" in by_path["schedule"]
    # warmup >= max_steps
    assert "shorter than training.max_steps" in by_path["schedule.warmup_steps"]
    text = str(info.value)
    assert text.count("\n  - ") == len(info.value.problems) >= 9


def test_schedule_aliases_resolve() -> None:
    assert load_config({"schedule": {"name": "WarmupCosine"}}).schedule.name == "warmup_cosine"
    assert load_config({"schedule": {"name": "Adaptive"}}).schedule.name == "plateau"
    assert load_config({"schedule": {"name": "MultiStage"}}).schedule.name == "multistep"


def test_unknown_schedule_option_names_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"schedule": {"name": "polynomial", "options": {"powr": 2}}})
    (problem,) = info.value.problems
    assert problem.path == "schedule.options.powr"
    assert "did you mean 'power'" in problem.message


def test_data_paths_required_for_files() -> None:
    with pytest.raises(ConfigError, match="data.paths: data.source is 'jsonl' but no files"):
        load_config({"data": {"source": "jsonl"}})


def test_heads_must_divide_hidden() -> None:
    with pytest.raises(ConfigError, match="divisible by num_attention_heads"):
        load_config({"model": {"build": {"hidden_size": 30, "num_attention_heads": 4}}})


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  max_steps: 5\n bad: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+") as info:
        load_config(f)
    assert str(f) in str(info.value)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_malformed_set() -> None:
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_set_overrides(["training.max_steps"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_set_overrides(["training..x=1"])


def test_empty_file_is_the_default(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("", encoding="utf-8")
    assert load_config(f) == load_config(None)


def test_warmup_in_a_higher_layer_replaces_a_lower_one(tmp_path: Path) -> None:
    f = write_yaml(tmp_path / "c.yaml", {"schedule": {"warmup_ratio": 0.1}})
    cfg = load_config(f, ["schedule.warmup_steps=7"])
    assert (cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio) == (7, None)
    with pytest.raises(ConfigError, match="two warmup forms"):
        load_config({"schedule": {"warmup_ratio": 0.1, "warmup_epochs": 1}})


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


#: Study files for `gearshift compare` (checked in tests/test_compare.py) and pipeline files
#: (checked in tests/e2e/test_default_pipeline.py), not run configs.
STUDIES = {"compare_warmup.yaml", "compare_alpha.yaml", "pipeline.yaml"}


@pytest.mark.parametrize("path", sorted(p for p in EXAMPLES.glob("*.yaml") if p.name not in STUDIES),
                         ids=lambda p: p.name)
def test_example_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    if path.name == "default.yaml":
        assert cfg == load_config(None)  # the embedded default, spelled out


def test_plateau_needs_evaluations() -> None:
    with pytest.raises(ConfigError, match="training.eval_every: the plateau schedule reacts"):
        load_config({"schedule": {"name": "Adaptive"}, "training": {"eval_every": None}})


def test_files_with_the_builtin_corpus_are_refused() -> None:
    with pytest.raises(ConfigError, match="files are given but data.source is 'pydoc_topics'"):
        load_config({"data": {"paths": ["a.txt"]}})


def test_task_sections_known_without_importing_tasks_first() -> None:
    """A fresh interpreter that imports only the package validates a config with a task section."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import gearshift as gs; c = gs.load_config('examples/sft_chat.yaml'); "
            "print(c.task, c.sft['train_on'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["sft", "assistant"]
