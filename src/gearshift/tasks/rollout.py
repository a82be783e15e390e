"""Sampling answers for REINFORCE (batched ``generate``, left padding, KV cache) and scoring
their tokens.

Unlike :func:`gearshift.tasks.generation.generate_answers` (evaluation, on a forked RNG),
sampling here draws from the run's own RNG: the RNG a checkpoint saves, so a resumed run draws
the same answers as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from gearshift.tasks.generation import _decode, _left_pad
from gearshift.tasks.value_head import PolicyWithValueHead


@dataclass
class Rollout:
    """Sampled answers, ``samples`` consecutive rows per prompt.

    Attributes:
        sequences: ``[answers, prompt_len + T]`` left-padded prompt then answer tokens.
        attention: The attention mask of ``sequences`` (0 on the prompt's left padding).
        positions: Position ids (counting from each prompt's first real token).
        prompt_len: Width of the left-padded prompts.
        tokens: ``[answers, T]`` the generated tokens.
        mask: ``[answers, T]`` 1 on each answer's tokens up to and including its EOS.
        texts: The decoded answers (up to the EOS).
    """

    sequences: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    prompt_len: int
    tokens: torch.Tensor
    mask: torch.Tensor
    texts: list[str]


def sample_rollout(policy: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], *,
                   samples: int, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0) -> Rollout:
    """Sample ``samples`` answers to each prompt (token ids) from ``policy``, in eval mode and
    without gradients (the caller computes log-probabilities with gradients afterwards)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    # top_k=0: no top-k cut (None would fall back to the model default of 50), so the answers
    # come from softmax(logits / temperature), the policy whose log-probabilities are trained.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True,
                              temperature=temperature, top_p=top_p if top_p < 1.0 else None,
                              top_k=0, use_cache=True, pad_token_id=pad, eos_token_id=eos,
                              remove_invalid_values=True)
    device = next(policy.parameters()).device
    ids, attention = _left_pad([list(p) for p in prompts], pad)
    ids = ids.repeat_interleave(samples, dim=0).to(device)
    attention = attention.repeat_interleave(samples, dim=0).to(device)
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=attention,
                                  generation_config=config)
    finally:
        policy.train(was_training)
    width = ids.shape[1]
    tokens = out[:, width:]
    if tokens.shape[1] < max_new_tokens:  # every answer ended early: pad to a fixed width
        fill = torch.full((tokens.shape[0], max_new_tokens - tokens.shape[1]), pad,
                          dtype=tokens.dtype, device=tokens.device)
        tokens = torch.cat([tokens, fill], dim=1)
    is_eos = (tokens == eos).long()
    # A token is the answer's while no EOS came before it (the EOS itself included).
    mask = ((is_eos.cumsum(-1) - is_eos) == 0).float()
    sequences = torch.cat([ids, tokens], dim=1)
    full_attention = torch.cat([attention, torch.ones_like(tokens)], dim=1)
    positions = (full_attention.cumsum(-1) - 1).clamp(min=0)
    texts = [_decode(tokenizer, row) for row in tokens.tolist()]
    return Rollout(sequences, full_attention, positions, width, tokens, mask, texts)


def policy_forward(model: nn.Module, raw: nn.Module, rollout: Rollout,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and values (None without a value head) at the positions that chose each
    generated token."""
    start = rollout.prompt_len - 1
    kwargs = {"input_ids": rollout.sequences, "attention_mask": rollout.attention,
              "position_ids": rollout.positions}
    if isinstance(raw, PolicyWithValueHead):
        logits, values = model(**kwargs)
        return logits[:, start:-1], values[:, start:-1].float()
    return model(**kwargs).logits[:, start:-1], None


def normalised(advantages: torch.Tensor, where: torch.Tensor, normalize: bool,
               ) -> tuple[torch.Tensor, float]:
    """``advantages`` (0 outside ``where``), standardised over ``where`` when asked; and their
    std before."""
    picked = advantages[where]
    std = float(picked.std(unbiased=False)) if picked.numel() else 0.0
    if normalize and picked.numel():
        advantages = (advantages - picked.mean()) / (picked.std(unbiased=False) + 1e-8)
    return advantages * where, std
