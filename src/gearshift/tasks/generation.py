"""Evaluation by generation: answer held-out prompts with ``model.generate`` and score them.

Prompts are rendered with the same chat template and system prompt as training, batched with
left padding (so every row's answer starts at the same column), and decoded greedily with the
KV cache unless a temperature is set. Sampling draws from RNG state forked off the global one
and seeded by the run's seed, so an evaluation never moves the training RNG and a resumed run
generates the very same answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from gearshift.data.chat import render_ids


@dataclass(frozen=True)
class GenerationPrompt:
    """A held-out prompt: the conversation up to the answer, and the reference answer."""

    messages: list[dict[str, str]]
    reference: str

    @property
    def question(self) -> str:
        """The last user message (what ``samples.jsonl`` shows as the prompt)."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


def generate_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[GenerationPrompt], *,
                     max_new_tokens: int, temperature: float = 0.0, batch_size: int = 32,
                     max_prompt_tokens: int | None = None, seed: int = 0) -> list[str]:
    """The model's answer to each prompt, decoded up to its EOS.

    Args:
        model: A causal LM with ``generate`` (a PEFT model too); put in eval mode by the caller.
        tokenizer: The run's tokenizer (its chat template renders the prompts).
        prompts: The conversations to answer.
        max_new_tokens: The longest answer.
        temperature: 0 = greedy; above 0 samples at this temperature.
        batch_size: Prompts generated at once.
        max_prompt_tokens: Prompts longer than this lose tokens from the left.
        seed: Seeds sampling (unused when greedy).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                              temperature=temperature if sampling else None, top_k=None,
                              top_p=None, use_cache=True, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    device = next(model.parameters()).device
    answers: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            rows = [render_ids(tokenizer, p.messages, add_generation_prompt=True)
                    for p in prompts[start:start + batch_size]]
            if max_prompt_tokens is not None:
                rows = [r[-max_prompt_tokens:] for r in rows]
            ids, attention = _left_pad(rows, pad)
            out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                 generation_config=config)
            answers.extend(_decode(tokenizer, row) for row in out[:, ids.shape[1]:].tolist())
    return answers


def exact_match_scores(answers: Sequence[str], prompts: Sequence[GenerationPrompt],
                       score: Callable[[str, str], float]) -> list[float]:
    """``score(answer, reference)`` for each prompt."""
    return [score(a, p.reference) for a, p in zip(answers, prompts, strict=True)]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(r):] = 1
    return ids, attention


def _decode(tokenizer: Any, row: list[int]) -> str:
    eos = tokenizer.eos_token_id
    if eos in row:
        row = row[: row.index(eos)]
    return tokenizer.decode(row, skip_special_tokens=True)
