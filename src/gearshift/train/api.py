"""``gearshift.train(config)``: the built-in ``lm`` task from a config, start to finish."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from gearshift.config import Config, load_config
from gearshift.data import load_corpus, load_tokenizer, pack_documents
from gearshift.errors import CheckpointError
from gearshift.models import validate_model_dir
from gearshift.rundir import RunPaths, find_auto_resume
from gearshift.tasks import CausalLMLoss, build_causal_lm
from gearshift.train.callbacks import Callback
from gearshift.train.trainer import RunResult, Trainer


def resolve_resume(config: Config, resume: str | Path | None) -> Path | None:
    """Turn ``--resume RUN_DIR|auto`` into a run directory (None: start fresh)."""
    target = resume if resume is not None else config.resume
    if target is None:
        return None
    if str(target) == "auto":
        found = find_auto_resume(config.output_dir, config.name)
        if found is None:
            print(f"--resume auto: no earlier '{config.name}' run with checkpoints under "
                  f"{config.output_dir}; starting a new run", file=sys.stderr)
        return found
    path = Path(target)
    if not RunPaths(path).checkpoints.is_dir():
        raise CheckpointError(f"{path} is not a run directory with checkpoints "
                              "(expected RUN_DIR/checkpoints/); check the path")
    return path


def train(config: Config | Mapping[str, Any] | str | Path | None = None, *,
          resume: str | Path | None = None, callbacks: Iterable[Callback] = (),
          audit: dict[str, Any] | None = None) -> RunResult:
    """Run the built-in causal-LM task described by ``config``.

    Args:
        config: a :class:`Config`, dict, YAML path, or None for the embedded default.
        resume: a run directory or ``"auto"``; overrides ``config.resume``.
        callbacks: extra :class:`Callback` instances.
        audit: where each non-default value came from (written to ``overrides.json``).

    Returns:
        The :class:`RunResult` (run directory, final step, eval loss before and after).

    Example:
        >>> result = train({"training": {"max_steps": 20}})
        >>> result.metrics["eval/loss"] < result.metrics["eval/loss_before"]
        True
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    resume_dir = resolve_resume(cfg, resume)
    if cfg.model.path is not None:
        validate_model_dir(cfg.model.path)  # list what is missing before the tokenizer complains
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path)
    d = cfg.data
    corpus = load_corpus(d.source, d.paths, text_field=d.text_field,
                         messages_field=d.messages_field, on_error=d.on_error)
    if corpus.skipped:
        print(f"skipped {len(corpus.skipped)} bad data lines (data.on_error: skip); first: "
              f"{corpus.skipped[0]}", file=sys.stderr)
    packed = _quiet_pack(corpus.documents, tokenizer, cfg)
    set_seed(cfg.seed)  # the model's initial weights depend on the seed only
    model = build_causal_lm(cfg.model, vocab_size=len(tokenizer),
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model, packed.train, cfg, loss_fn=CausalLMLoss(),
                      eval_data=packed.eval, callbacks=callbacks, resume_from=resume_dir,
                      tokenizer=tokenizer, audit=audit)
    result = trainer.fit()
    if corpus.skipped:
        result.metrics["data/skipped_lines"] = float(len(corpus.skipped))
    return result


def _quiet_pack(documents: list[str], tokenizer: Any, cfg: Config) -> Any:
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return pack_documents(documents, tokenizer, seq_len=cfg.data.seq_len,
                              eval_fraction=cfg.data.eval_fraction,
                              max_eval_sequences=cfg.data.max_eval_sequences, seed=cfg.seed)
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()
