"""The ``sft`` task: chat supervised fine-tuning under a system-prompt profile.

Conversations come from JSONL (``data.source: jsonl``, a ``messages`` field per line) or from a
verifiable synthetic task (``data.source: synthetic``). Each gets the profile's system prompt
(``profile.policy``), is rendered with the tokenizer's chat template, and trains on the
assistant's tokens only (``sft.train_on: assistant``, the default) or on every token
(``all``); the loss is summed over target tokens, so accumulation weights tokens as in ``lm``.
Every evaluation gives the eval loss and, with ``eval.generate``, the exact match of answers
generated for held-out prompts (``eval/exact_match``), a few of which go to ``samples.jsonl``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from gearshift import rundir
from gearshift.config import Config
from gearshift.config.extensions import register_check
from gearshift.data import profiles
from gearshift.data.chat import ChatCollator, ChatExample, last_assistant, tokenize_conversation
from gearshift.data.synthetic import make_examples, normalize, score
from gearshift.errors import DataError, ModelError, Problem
from gearshift.models import require_model_dir
from gearshift.tasks.generation import GenerationPrompt, exact_match_scores, generate_answers
from gearshift.tasks.lm import LMTask, build_causal_lm
from gearshift.train.callbacks import Callback
from gearshift.train.task import EvalLoop, TaskParts


class SftSection(BaseModel):
    """The ``sft:`` config section."""

    model_config = ConfigDict(extra="forbid")

    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="targets: the assistant's tokens only, or every token")


class SftTask(LMTask):
    """Chat supervised fine-tuning: ``model``, ``data``, ``profile``, ``sft``, ``eval`` sections.

    The profile's date is fixed when the run starts (``profile.date`` is filled in before the
    run's ``config.yaml`` is written), so a resumed run trains on exactly the same text.
    """

    name = "sft"
    config_section = SftSection

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.settings = SftSection.model_validate((config.model_extra or {}).get(self.name) or {})
        self.tokenizer: Any = None
        self.system_prompt = ""
        self.prompts: list[GenerationPrompt] = []
        self.samples: list[dict[str, Any]] = []  # of the latest evaluation, for samples.jsonl
        self.counts: dict[str, float] = {}

    # ------------------------------------------------------------------ build

    def build(self) -> TaskParts:
        from accelerate.utils import set_seed

        cfg = self.config
        tok = self.prepare_chat(self.settings.train_on)
        train_chats, eval_chats, skipped = self._conversations()
        train = self._tokenize(train_chats, "train")
        evals = self._tokenize(eval_chats, "eval")
        if not train:
            raise DataError(f"no training conversation fits in data.seq_len={cfg.data.seq_len} "
                            "tokens; raise data.seq_len")
        if cfg.data.max_eval_sequences is not None:
            evals = evals[: cfg.data.max_eval_sequences]
        self.prompts = [GenerationPrompt(c[: last_assistant(c)], c[last_assistant(c)]["content"])
                        for c in eval_chats]
        if skipped:
            print(f"skipped {len(skipped)} bad data lines (data.on_error: skip); first: "
                  f"{skipped[0]}", file=sys.stderr)
            self.counts["data/skipped_lines"] = float(len(skipped))
        if self.counts.get("data/truncated") or self.counts.get("data/too_long"):
            print(f"data: {int(self.counts.get('data/truncated', 0))} conversations truncated "
                  f"on the left, {int(self.counts.get('data/too_long', 0))} skipped because their"
                  f" last assistant turn alone exceeds data.seq_len={cfg.data.seq_len}",
                  file=sys.stderr)
        set_seed(cfg.seed)  # the model's initial weights depend on the seed only
        model = build_causal_lm(cfg.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return TaskParts(model, train, evals or None, tokenizer=tok,
                         collate_fn=ChatCollator(pad), result_metrics=dict(self.counts),
                         callbacks=[ChatRunCallback(self)])

    def prepare_chat(self, train_on: str = "assistant") -> Any:
        """Load the tokenizer (checking its chat template) and render the profile's system
        prompt, its date fixed now; returns the tokenizer."""
        from gearshift.data import load_tokenizer

        cfg = self.config
        if cfg.model.path is not None:
            require_model_dir(cfg.model.path, tokenizer=cfg.model.tokenizer == "auto")
        self.tokenizer = tok = load_tokenizer(cfg.model.tokenizer, cfg.model.path)
        _check_chat_template(tok, cfg, train_on)
        p = cfg.profile
        if p.date is None:
            p.date = profiles.today().isoformat()  # fixed now; config.yaml keeps it for resumes
        profile = profiles.load_profile(p.name)
        self.system_prompt = profile.render(date=p.date,
                                            variables={"model_name": _model_name(cfg),
                                                       **p.variables})
        shown = repr(self.system_prompt) if self.system_prompt else "(none)"
        print(f"profile {profile.name} ({p.date}, policy {p.policy}): system prompt {shown}",
              file=sys.stderr)
        return tok

    def _conversations(self) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]],
                                      list[str]]:
        """Train and eval conversations (profile applied) and the bad lines skipped."""
        from gearshift.data.chat import load_conversations

        d, p = self.config.data, self.config.profile
        if d.source == "synthetic":
            s = d.synthetic
            assert s is not None  # validated with the config
            split = {
                name: [[{"role": "user", "content": e.prompt},
                        {"role": "assistant", "content": e.answer}]
                       for e in make_examples(s.name, n, seed=self.config.seed, split=name,
                                              **s.options)]
                for name, n in (("train", s.num_train), ("eval", s.num_eval))}
            chats, held_out, skipped = split["train"], split["eval"], []
        elif d.source == "jsonl":
            loaded = load_conversations(d.paths, messages_field=d.messages_field,
                                        on_error=d.on_error)
            chats, skipped = loaded.conversations, loaded.skipped
            order = list(range(len(chats)))
            random.Random(self.config.seed).shuffle(order)
            n_eval = min(round(len(chats) * d.eval_fraction), len(chats) - 1)
            if d.eval_fraction > 0 and len(chats) > 1:
                n_eval = max(n_eval, 1)
            held = set(order[:n_eval])
            held_out = [c for i, c in enumerate(chats) if i in held]
            chats = [c for i, c in enumerate(chats) if i not in held]
        else:
            raise DataError(f"task: sft reads chat conversations: set data.source to 'jsonl' "
                            f"(a {d.messages_field!r} field per line) or 'synthetic', not "
                            f"{d.source!r}")

        def with_profile(chat: list[dict[str, str]]) -> list[dict[str, str]]:
            return profiles.apply_policy(chat, self.system_prompt, p.policy)

        return [with_profile(c) for c in chats], [with_profile(c) for c in held_out], skipped

    def _tokenize(self, chats: list[list[dict[str, str]]], split: str) -> list[dict[str, Any]]:
        out = []
        for chat in chats:
            example: ChatExample | None = tokenize_conversation(
                self.tokenizer, chat, seq_len=self.config.data.seq_len,
                train_on=self.settings.train_on)
            if example is None:
                self.counts["data/too_long"] = self.counts.get("data/too_long", 0.0) + 1
                continue
            if example.truncated:
                self.counts["data/truncated"] = self.counts.get("data/truncated", 0.0) + 1
            out.append({"input_ids": torch.tensor(example.input_ids),
                        "labels": torch.tensor(example.labels)})
        return out

    # ------------------------------------------------------------------ training and evaluation

    # loss and units: LMTask's (token-weighted next-token cross-entropy on the targets)

    def evaluate(self, model: nn.Module, eval_data: Sequence[Any], loop: EvalLoop,
                 ) -> dict[str, float]:
        metrics = super().evaluate(model, eval_data, loop)  # eval/loss and eval/ppl
        gen = self.config.eval.generate
        if gen is None or not self.prompts:
            return metrics
        prompts = self.prompts[: gen.num_samples]
        raw = getattr(model, "module", model)  # generate on the model, not its DDP wrapper
        answers = generate_answers(raw, self.tokenizer, prompts,
                                   max_new_tokens=gen.max_new_tokens,
                                   temperature=gen.temperature, batch_size=gen.batch_size,
                                   max_prompt_tokens=self.config.data.seq_len,
                                   seed=self.config.seed)
        scores = exact_match_scores(answers, prompts, self._score)
        metrics["eval/exact_match"] = sum(scores) / len(scores)
        self.samples = [{"prompt": p.question, "completion": a, "reference": p.reference,
                         "score": s} for p, a, s in list(zip(prompts, answers, scores,
                                                             strict=True))[: gen.keep_samples]]
        return metrics

    def _score(self, completion: str, reference: str) -> float:
        d = self.config.data
        if d.source == "synthetic" and d.synthetic is not None:
            return score(d.synthetic.name, completion, reference)
        return 1.0 if normalize(completion) == normalize(reference) else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"system_prompt": self.system_prompt}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("system_prompt")
        if saved is not None and saved != self.system_prompt:
            print(f"warning: this run was trained with the system prompt {saved!r} but the "
                  f"config now renders {self.system_prompt!r}; to continue on the same text, "
                  "resume with `gearshift resume RUN_DIR` (its config.yaml keeps profile.date) "
                  "or set profile.date", file=sys.stderr)


@register_check
def _sft_config_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """``task: sft`` reads conversations; ``eval.generate`` needs a task that generates."""
    if not isinstance(raw, Mapping):
        return []
    data, evals = raw.get("data"), raw.get("eval")
    source = data.get("source", "pydoc_topics") if isinstance(data, Mapping) else None
    out = []
    if raw.get("task") == "sft" and source in ("pydoc_topics", "text"):
        out.append(Problem("data.source", f"task: sft reads chat conversations, not {source!r};"
                           " set data.source to 'jsonl' (a messages field per line) or "
                           "'synthetic'"))
    if raw.get("task", "lm") == "lm" and isinstance(evals, Mapping) and evals.get("generate"):
        out.append(Problem("eval.generate", "task: lm has no prompts to answer; generation "
                           "eval is for chat runs (task: sft)"))
    return out


class ChatRunCallback(Callback):
    """Logs the system prompt in force and the data counts, and writes ``samples.jsonl``."""

    def __init__(self, task: SftTask) -> None:
        self.task = task

    @property
    def state_key(self) -> str:
        return "sft"

    def on_train_start(self, trainer: Any) -> None:
        if not trainer.is_main:
            return
        p = trainer.config.profile
        trainer.logger.log_event(trainer.step, "system_prompt", profile=p.name, date=p.date,
                                 policy=p.policy, system_prompt=self.task.system_prompt)
        path = rundir.RunPaths(trainer.run_dir).samples
        if trainer.step == 0:
            if self.task.counts:
                trainer.logger.log_metrics(0, dict(self.task.counts))
        elif path.is_file():
            rundir.drop_torn_tail(path)
            rundir.truncate_after(path, trainer.step)  # a resumed run redoes these evaluations

    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if not trainer.is_main or not self.task.samples:
            return
        path = rundir.RunPaths(trainer.run_dir).samples
        for sample in self.task.samples:
            rundir.append_record(path, {"step": trainer.step, **sample})
        self.task.samples = []


def _model_name(cfg: Config) -> str:
    return Path(cfg.model.path).name if cfg.model.path else cfg.name


def _check_chat_template(tok: Any, cfg: Config, train_on: str) -> None:
    where = cfg.model.path or "the built-in byte-level tokenizer"
    template = getattr(tok, "chat_template", None)
    if not template:
        raise ModelError(f"the tokenizer of {where} has no chat template; task: sft renders "
                         "conversations with one. Save a tokenizer with a chat_template there, "
                         "or set model.tokenizer: byte")
    text = template if isinstance(template, str) else str(template)
    if train_on == "assistant" and "generation" not in text:
        raise ModelError(f"the chat template of {where} has no {{% generation %}} markers, so "
                         "assistant tokens cannot be told apart; add them around the assistant "
                         "reply or set sft.train_on: all")
