"""A learned value head around a policy (``rl.baseline: value``), as a model transform.

The transform wraps the policy (after LoRA, when on) in :class:`PolicyWithValueHead`: the loop's
optimizer trains the head with the policy, checkpoints hold it (also beside LoRA adapters, whose
checkpoints keep only trainable tensors), and the export is the policy alone — ``final/`` loads
with ``AutoModelForCausalLM.from_pretrained`` (or PEFT) as if there were no head.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from gearshift.transforms import Transform


class PolicyWithValueHead(nn.Module):
    """A causal LM and a linear value head on its last hidden state.

    The head starts at zero (every value 0), so a fresh run's first advantages are the plain
    returns.

    Args:
        policy: The causal LM (a PEFT model too).
        hidden_size: Width of the policy's last hidden state.

    Example:
        >>> # logits, values = PolicyWithValueHead(model, 64)(input_ids=ids)  # values: [B, L]
    """

    def __init__(self, policy: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, L, V], values [B, L])``: values[:, t] is the value of the state after
        token t."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values


class ValueHeadTransform(Transform):
    """Put a :class:`PolicyWithValueHead` around the model; export the policy only."""

    name: ClassVar[str] = "value_head"
    wrapper: ClassVar[bool] = True

    def apply(self, model: nn.Module) -> nn.Module:
        config: Any = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise TypeError("rl.baseline: value needs a model with config.hidden_size")
        return PolicyWithValueHead(model, int(hidden))

    def checkpoint_tensors(self, model: nn.Module, names: set[str]) -> set[str]:
        head = {n for n, _ in model.named_parameters() if n.startswith("value_head.")}
        return names | head

    def merge(self, model: nn.Module) -> nn.Module:
        return model.policy if isinstance(model, PolicyWithValueHead) else model
