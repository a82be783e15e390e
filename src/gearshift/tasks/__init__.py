"""Tasks: what a batch means and what the loss is."""

from gearshift.tasks.base import TokenWeightedLoss
from gearshift.tasks.lm import CausalLMLoss, build_causal_lm

__all__ = ["CausalLMLoss", "TokenWeightedLoss", "build_causal_lm"]
