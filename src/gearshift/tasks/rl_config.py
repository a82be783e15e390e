"""The ``rl:`` config section of ``task: reinforce`` and its cross-section checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gearshift.config.extensions import register_check
from gearshift.errors import Problem
from gearshift.tasks.rewards import RewardSpec


class RlSection(BaseModel):
    """The ``rl:`` config section (``task: reinforce``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompts_per_step: int = Field(16, ge=1, description="prompts per optimizer step")
    samples_per_prompt: int = Field(4, ge=1, description="answers sampled per prompt (the "
                                    "group)")
    num_episodes: int = Field(10000, ge=1, description="sampled answers in total; sets the "
                              "optimizer steps unless training.max_steps is given")
    max_new_tokens: int = Field(16, ge=1, description="longest sampled answer")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (the policy "
                               "trained is softmax(logits / temperature))")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling; 1 = off")
    reward: RewardSpec = Field(default_factory=lambda: RewardSpec(name="exact_match"),
                               description="{name: exact_match | contains | regex, ...} or "
                               "{function: 'package.module:name'}")
    baseline: Literal["none", "moving_average", "leave_one_out", "value"] = Field(
        "leave_one_out", description="what is subtracted from the reward: nothing, a moving "
        "average, the mean reward of the other answers to the same prompt, or a learned value "
        "head")
    baseline_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="moving_average: "
                                     "b = momentum * b + (1 - momentum) * step mean reward")
    normalize_advantages: bool = Field(True, description="advantages normalised (mean 0, std "
                                       "1) over the step's batch")
    entropy_coefficient: float = Field(0.01, ge=0.0, description="weight of the entropy bonus")
    entropy_decay: float = Field(0.995, gt=0.0, le=1.0, description="the entropy coefficient "
                                 "is multiplied by this after every optimizer step")
    kl_coefficient: float = Field(0.0, ge=0.0, description="weight of the KL penalty to the "
                                  "frozen starting policy (a reference copy is kept only when "
                                  "> 0)")
    value_loss_coefficient: float = Field(0.5, ge=0.0, description="weight of the value head's "
                                          "loss (baseline: value)")
    use_gae: bool = Field(False, description="per-token advantages by generalized advantage "
                          "estimation from the value head (baseline: value)")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount per generated token")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="GAE's lambda")
    validation_every: int = Field(50, ge=1, description="greedy held-out reward every N "
                                  "optimizer steps (sets training.eval_every)")
    patience: int | None = Field(10, ge=1, description="stop after this many validations "
                                 "without an improvement larger than min_delta (null = never)")
    min_delta: float = Field(0.0, ge=0.0, description="smallest improvement of the validation "
                             "reward that counts")
    keep: Literal["best", "last"] = Field("best", description="best = final/ is the policy with "
                                          "the best validation reward (kept in best/ as it "
                                          "goes); last = the last policy")
    on_reward_error: Literal["error", "skip"] = Field(
        "error", description="a reward function that raises or returns NaN / a non-number: "
        "stop with an error naming it, or drop that answer and count it")

    @model_validator(mode="after")
    def _consistent(self) -> RlSection:
        if self.baseline == "leave_one_out" and self.samples_per_prompt < 2:
            raise ValueError("baseline: leave_one_out needs samples_per_prompt >= 2 (the other "
                             "answers to the same prompt); raise samples_per_prompt or choose "
                             "another baseline")
        if self.use_gae and self.baseline != "value":
            raise ValueError("use_gae needs the value head's per-token values: set baseline: "
                             "value")
        return self


@register_check
def _reinforce_config_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """``task: reinforce`` answers chat prompts with a reference; its step is whole prompts."""
    if not isinstance(raw, Mapping) or raw.get("task") != "reinforce":
        return []
    out = []
    data = raw.get("data")
    source = data.get("source", "pydoc_topics") if isinstance(data, Mapping) else None
    if source in ("pydoc_topics", "text"):
        out.append(Problem("data.source", f"task: reinforce answers chat prompts, not "
                           f"{source!r}; set data.source to 'synthetic' (a verifiable task) "
                           "or 'jsonl' (conversations whose last assistant turn is the "
                           "reference)"))
    rl, training = raw.get("rl"), raw.get("training")
    pps = rl.get("prompts_per_step", 16) if isinstance(rl, Mapping) else 16
    acc = training.get("accumulate_grad_batches", 1) if isinstance(training, Mapping) else 1
    if isinstance(pps, int) and isinstance(acc, int) and acc > 0 and pps % acc:
        out.append(Problem("rl.prompts_per_step", f"{pps} prompts per step cannot be split into "
                           f"training.accumulate_grad_batches={acc} equal micro-batches; make "
                           "it a multiple"))
    return out
