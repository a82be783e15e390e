"""``gearshift daemon init``: the base directory, its ``daemon.yaml`` and the initial model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from gearshift.config import Config, load_config
from gearshift.daemon import snapshots
from gearshift.daemon.layout import DaemonPaths
from gearshift.errors import ConfigError, Problem, UsageError
from gearshift.models import is_adapter_dir, require_model_dir

#: The ``daemon.yaml`` written when ``--config`` is not given (also ``examples/daemon.yaml``).
DEFAULT_CONFIG = """\
# The training daemon's config: a normal gearshift config plus a `daemon:` section.
# Each file dropped into inbox/ is trained as one run of this config, starting from
# current_model/ (model.path and data.paths are filled in by the daemon for each file).
name: daemon
task: sft                         # chat fine-tuning: one {"messages": [...]} object per line
seed: 1234
model:
  tokenizer: auto                 # the current model's own tokenizer
  build:                          # only used by `daemon init` without --model
    hidden_size: 64
    intermediate_size: 176
    num_hidden_layers: 2
    num_attention_heads: 4
    max_position_embeddings: 256
data:
  source: jsonl
  paths: [inbox/FILE.jsonl]       # replaced: each file's run reads that file
  messages_field: messages
  seq_len: 256
  eval_fraction: 0.1
  on_error: error                 # a bad line sends the file to failed/ (or: skip)
profile:
  name: concise                   # the system prompt; its date is fixed when a file is taken
  policy: replace
lora:
  enabled: true                   # the first file makes an adapter; later files continue it
  r: 8
  alpha: 16
optim:
  learning_rate: 1.0e-3
schedule:
  name: warmup_cosine
  warmup_ratio: 0.1
training:
  epochs: 1                       # one pass over each file
  batch_size: 8
  gradient_checkpointing: true    # memory before speed on a shared workstation
  eval_every: null                # evaluate at the end of each file
  log_every: 10
checkpoint:
  every: 20                       # a kill costs at most this many steps
  keep_last: 2
logging:
  progress_bar: false
  tensorboard: false
daemon:
  settle_seconds: 2               # a file is taken once unchanged this long
  poll_seconds: 1
  watch: true                     # watchdog events (polling runs as well)
  keep_snapshots: 5
  status_every_seconds: 5
  min_examples: 2
  max_memory_mb: null             # e.g. 12000: halve micro-batches above it
"""


#: ``data.paths`` while validating ``daemon.yaml``: each file's run gets the file itself.
PLACEHOLDER = {"data.paths": ["inbox/FILE.jsonl"]}


def load_daemon_config(path: str | Path) -> Config:
    """A daemon config (``daemon.yaml``), validated, with the daemon's own requirements.

    Raises:
        ConfigError: Naming every problem (a normal config problem, or one the daemon adds).
    """
    cfg = load_config(path, PLACEHOLDER)
    if cfg.data.source != "jsonl":
        raise ConfigError([Problem("data.source", "the daemon trains on the JSONL files "
                                   "dropped into its inbox; set data.source: jsonl, not "
                                   f"{cfg.data.source!r}")], source=str(path))
    return cfg


def init_daemon(base: str | Path, model: str | Path | None = None,
                config: str | Path | None = None) -> DaemonPaths:
    """Create the daemon layout in ``base``, its ``daemon.yaml`` and the initial snapshot.

    Args:
        base: The base directory (created; must not hold a daemon yet).
        model: The initial model: a model or LoRA adapter directory. None: a small
            Llama-architecture model built from ``model.build`` with the byte-level tokenizer.
        config: A gearshift config to use as ``daemon.yaml`` (default: :data:`DEFAULT_CONFIG`).

    Raises:
        UsageError: When ``base`` already holds a daemon.
        ConfigError: When the config is invalid, naming every problem.
        ModelError: When ``model`` is not a valid model directory.
    """
    paths = DaemonPaths(base)
    if paths.config.exists():
        raise UsageError(f"{paths.base} already holds a daemon ({paths.config} exists); use "
                         "another directory, or start it with `gearshift daemon start "
                         f"{paths.base}`")
    if config is not None:
        cfg = load_daemon_config(config)  # a missing or bad file: a ConfigError naming it
        text = Path(config).read_text(encoding="utf-8")
    else:
        cfg, text = load_config(_parse(DEFAULT_CONFIG), PLACEHOLDER), DEFAULT_CONFIG
    if model is not None:
        require_model_dir(model)
    paths.create()
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-initial"
    staging = paths.snapshots / ".staging-initial"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        if model is None:
            source = _build_model(cfg, staging)
            model_name = cfg.daemon.model_name or cfg.name
        else:
            source = _stage_adapter(Path(model), staging) if is_adapter_dir(model) else \
                Path(model)
            model_name = cfg.daemon.model_name or Path(model).resolve().name
        snap = snapshots.write_snapshot(source, paths.snapshots, name, info={
            "file": None, "run": None, "model_name": model_name,
            "source": str(Path(model).resolve()) if model is not None else "built"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    snapshots.switch_current(paths, snap)
    paths.config.write_text(text, encoding="utf-8")
    return paths


def _parse(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def _build_model(cfg, directory: Path) -> Path:  # type: ignore[no-untyped-def]
    from accelerate.utils import set_seed

    from gearshift.data import byte_level_tokenizer
    from gearshift.tasks.lm import build_causal_lm
    from gearshift.transforms import save_plain

    tok = byte_level_tokenizer()
    set_seed(cfg.seed)
    model = build_causal_lm(cfg.model.model_copy(update={"path": None}), vocab_size=len(tok),
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    directory.mkdir(parents=True)
    save_plain(model, directory)
    tok.save_pretrained(str(directory))
    return directory


def _stage_adapter(adapter: Path, directory: Path) -> Path:
    """A copy of an adapter whose base outside it is named by absolute path (the snapshot
    lives elsewhere, so a relative name would point nowhere)."""
    from gearshift.models import adapter_base

    base = adapter_base(adapter).resolve()
    if adapter.resolve() in base.parents:
        return adapter  # the base travels inside the adapter directory
    shutil.copytree(adapter, directory)
    config_file = directory / "adapter_config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory
