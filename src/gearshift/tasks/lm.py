"""The ``lm`` task: causal language modelling (pretraining and supervised fine-tuning)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from gearshift.config import Config
from gearshift.config.schema import ModelConfig
from gearshift.models import load_base_model, require_model_dir
from gearshift.train.task import EvalLoop, LossOutput, Task, TaskParts, perplexity

IGNORE_INDEX = -100


def build_causal_lm(cfg: ModelConfig, *, vocab_size: int, bos_token_id: int | None = None,
                    eos_token_id: int | None = None, pad_token_id: int | None = None,
                    ) -> PreTrainedModel:
    """A causal LM from a local Hugging Face directory, or a Llama built from ``cfg.build``.

    When ``cfg.path`` is a LoRA adapter directory, this is its base model; the adapter is put
    on (and trained further) by the model transform :class:`gearshift.transforms.AdapterTransform`.

    Raises:
        ModelError: when ``cfg.path`` is not a valid model directory, naming every problem.
    """
    if cfg.path is not None:
        return load_base_model(Path(cfg.path))
    b = cfg.build
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads or b.num_attention_heads,
        max_position_embeddings=b.max_position_embeddings,
        rope_theta=b.rope_theta,
        tie_word_embeddings=b.tie_word_embeddings,
        attention_dropout=b.dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return LlamaForCausalLM(config)


class CausalLMLoss:
    """Next-token cross-entropy summed over target tokens (a :class:`TokenWeightedLoss`).

    Positions whose label is ``-100`` (or the pad token, when ``pad_token_id`` is given) are not
    targets. Logits are upcast to float32 for the loss whatever the compute precision.

    Example:
        >>> loss_fn = CausalLMLoss()
        >>> # total = loss_fn(model, {"input_ids": ids}); per_token = total / loss_fn.units(batch)
    """

    def __init__(self, pad_token_id: int | None = None) -> None:
        self.pad_token_id = pad_token_id

    def _labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.get("labels", batch["input_ids"])[:, 1:]
        if self.pad_token_id is not None:
            labels = labels.masked_fill(labels == self.pad_token_id, IGNORE_INDEX)
        return labels

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((self._labels(batch) != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        kwargs = {"input_ids": batch["input_ids"]}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        logits = model(**kwargs).logits[:, :-1]
        labels = self._labels(batch)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )


class LMTask(Task):
    """Causal language modelling on the configured corpus: ``model``, ``data`` sections.

    Builds the tokenizer, the packed train / eval sequences and the model (seeded), trains on
    next-token cross-entropy summed over target tokens, and judges by the token-weighted eval
    loss and its perplexity.
    """

    name = "lm"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.loss_fn = CausalLMLoss()

    def build(self) -> TaskParts:
        from accelerate.utils import set_seed

        from gearshift.data import load_corpus, load_tokenizer

        cfg = self.config
        if cfg.model.path is not None:
            # Every problem of the directory before the tokenizer complains about the first one.
            require_model_dir(cfg.model.path, tokenizer=cfg.model.tokenizer == "auto")
        tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path)
        d = cfg.data
        corpus = load_corpus(d.source, d.paths, text_field=d.text_field,
                             messages_field=d.messages_field, on_error=d.on_error)
        extra = {}
        if corpus.skipped:
            print(f"skipped {len(corpus.skipped)} bad data lines (data.on_error: skip); first: "
                  f"{corpus.skipped[0]}", file=sys.stderr)
            extra["data/skipped_lines"] = float(len(corpus.skipped))
        packed = _quiet_pack(corpus.documents, tokenizer, cfg)
        set_seed(cfg.seed)  # the model's initial weights depend on the seed only
        model = build_causal_lm(cfg.model, vocab_size=len(tokenizer),
                                bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        return TaskParts(model, packed.train, packed.eval, tokenizer=tokenizer,
                         result_metrics=extra)

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        return LossOutput(self.loss_fn(model, batch))

    def units(self, batch: Any) -> int:
        return self.loss_fn.units(batch)

    def evaluate(self, model: nn.Module, eval_data: Sequence[Any], loop: EvalLoop,
                 ) -> dict[str, float]:
        metrics = super().evaluate(model, eval_data, loop)
        metrics["eval/ppl"] = perplexity(metrics["eval/loss"])
        return metrics


def _quiet_pack(documents: list[str], tokenizer: Any, cfg: Config) -> Any:
    from datasets.utils import logging as ds_logging

    from gearshift.data import pack_documents

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return pack_documents(documents, tokenizer, seq_len=cfg.data.seq_len,
                              eval_fraction=cfg.data.eval_fraction,
                              max_eval_sequences=cfg.data.max_eval_sequences, seed=cfg.seed)
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()
