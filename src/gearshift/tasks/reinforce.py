"""The ``reinforce`` task: REINFORCE from a verifiable reward, on chat prompts of a profile.

A batch is a set of prompts. For each, :meth:`ReinforceTask.loss` samples
``rl.samples_per_prompt`` answers with batched ``model.generate`` (KV cache, left padding) from
the run's own RNG — which every checkpoint holds, so a resumed run samples the very same
answers — scores them with the reward function, subtracts the baseline, and returns the
token-level policy-gradient loss. Clipping, the LR schedule, precision, accumulation,
checkpoints and out-of-memory / NaN recovery are the loop's. Every ``rl.validation_every``
steps the policy answers the held-out prompts greedily (``eval/reward``, ``eval/exact_match``);
:class:`RlRunCallback` keeps the best policy in ``best/`` and stops the run early (event
``early_stop``) after ``rl.patience`` validations without improvement.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gearshift.config import Config
from gearshift.data.chat import last_assistant, render_ids
from gearshift.errors import DataError
from gearshift.models import is_adapter_dir
from gearshift.tasks.generation import GenerationPrompt, generate_answers
from gearshift.tasks.rewards import RewardError, build_reward, call_reward
from gearshift.tasks.rl_config import RlSection
from gearshift.tasks.rl_run import RlRunCallback
from gearshift.tasks.rollout import Rollout, normalised, policy_forward, sample_rollout
from gearshift.tasks.sft import SftTask
from gearshift.tasks.value_head import PolicyWithValueHead, ValueHeadTransform
from gearshift.train.task import EvalLoop, LossOutput, TaskParts

__all__ = ["ReinforceTask", "RlSection", "generalized_advantage_estimation",
           "leave_one_out_baseline"]


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """Entry (i, j): the mean reward of row i without entry j.

    Args:
        rewards: ``[prompts, samples]``, at least two samples per prompt.

    Example:
        >>> leave_one_out_baseline(torch.tensor([[1.0, 0.0, 0.0]]))
        tensor([[0.0000, 0.5000, 0.5000]])
    """
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples per prompt, got {n}")
    return (rewards.sum(dim=-1, keepdim=True) - rewards) / (n - 1)


def generalized_advantage_estimation(rewards: torch.Tensor, values: torch.Tensor,
                                     mask: torch.Tensor, *, gamma: float, lam: float,
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages and returns by GAE over right-padded generated tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with the value after the last generated token 0,
    and ``A_t = delta_t + gamma * lam * A_{t+1}``; ``returns = A + V``. Both are 0 where
    ``mask`` is 0. With ``lam = 1`` the advantage is the discounted return minus the value.

    Args:
        rewards: ``[batch, tokens]`` reward of each token (0 where none arrives).
        values: ``[batch, tokens]`` value of the state each token is chosen in.
        mask: ``[batch, tokens]``, 1 on generated tokens (a prefix of each row).
        gamma: Discount per token.
        lam: GAE's lambda.

    Returns:
        ``(advantages, returns)``, each ``[batch, tokens]``.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    tokens = values.shape[1]
    for t in reversed(range(tokens)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < tokens else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


class ReinforceTask(SftTask):
    """REINFORCE on chat prompts: ``model``, ``data``, ``profile``, ``rl`` sections.

    The loss of a micro-batch, averaged over its generated tokens (each answer's tokens up to and
    including its EOS; every token weighs the same, whatever the answer's length), is

        ``-A_t * log pi(a_t) - c_entropy * H_t + c_kl * KL_t + c_value * (V_t - R_t)^2``

    where ``pi = softmax(logits / temperature)`` is the sampling policy, ``KL_t`` the unbiased
    non-negative estimator ``exp(q) - q - 1`` with ``q = log pi_ref - log pi``, and the
    advantage ``A`` is the reward minus the baseline (the same for every token of an answer),
    or per token from the value head (``baseline: value``: the discounted return minus the
    value, or GAE with ``use_gae``). Micro-batches are weighted by their answers, so with one
    micro-batch per step (the default) the step's loss is exactly the per-token mean; with
    accumulation, the per-token mean and the advantage normalisation are those of each
    micro-batch.
    """

    name = "reinforce"
    config_section = RlSection
    section_name = "rl"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.rl = RlSection.model_validate((config.model_extra or {}).get("rl") or {})
        self.reward_fn = None
        self.train_prompts: list[GenerationPrompt] = []
        self.reference: nn.Module | None = None  # the frozen starting policy (kl > 0 only)
        self._prompt_ids: dict[int, list[int]] = {}
        # Checkpointed state (state_dict).
        self.baseline: float | None = None
        self.entropy_coefficient = self.rl.entropy_coefficient
        self.best_reward: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0
        self.last_validation_step: int | None = None
        self.reward_errors = 0
        # Of the step being computed (reset before every attempt, committed after the update).
        self._attempt: dict[str, Any] = {}
        self.step_skipped: list[str] = []  # reward errors of the last update (for the event)
        self.recent_groups: list[dict[str, Any]] = []  # sampled at the last update
        self.start_attempt()

    # ------------------------------------------------------------------ build

    def build(self) -> TaskParts:
        from accelerate.utils import set_seed

        from gearshift.tasks.lm import build_causal_lm

        cfg, rl = self.config, self.rl
        tok = self.prepare_chat()
        self.reward_fn = build_reward(rl.reward, self._score)
        train_chats, eval_chats, skipped = self._conversations()
        self.train_prompts = [_prompt(c) for c in train_chats]
        self.prompts = [_prompt(c) for c in eval_chats]
        if not self.train_prompts:
            raise DataError("task: reinforce has no training prompt; add data")
        if skipped:
            print(f"skipped {len(skipped)} bad data lines (data.on_error: skip); first: "
                  f"{skipped[0]}", file=sys.stderr)
            self.counts["data/skipped_lines"] = float(len(skipped))
        t = cfg.training
        t.batch_size = rl.prompts_per_step // t.accumulate_grad_batches
        t.eval_every = rl.validation_every
        episodes_per_step = rl.prompts_per_step * rl.samples_per_prompt
        if t.max_steps is None:
            t.max_steps = max(1, math.ceil(rl.num_episodes / episodes_per_step))
        print(f"rl: {t.max_steps} steps of {rl.prompts_per_step} prompts x "
              f"{rl.samples_per_prompt} answers ({t.max_steps * episodes_per_step} episodes), "
              f"baseline {rl.baseline}, {rl.reward.label}", file=sys.stderr)
        if cfg.model.path is None:
            print("warning: model.path is null, so REINFORCE starts from a random model that "
                  "is almost never right; point it at an sft run's final/ "
                  "(--set model.path=RUN_DIR/final)", file=sys.stderr)
        set_seed(cfg.seed)  # the model's initial weights depend on the seed only
        model = build_causal_lm(cfg.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if rl.kl_coefficient > 0:
            self.reference = self._frozen_copy(model)
        return TaskParts(model, [{"index": i} for i in range(len(self.train_prompts))],
                         [{"index": i} for i in range(len(self.prompts))] or None,
                         tokenizer=tok, result_metrics=dict(self.counts),
                         callbacks=[RlRunCallback(self)],
                         transforms=[ValueHeadTransform()] if rl.baseline == "value" else [])

    def _frozen_copy(self, model: nn.Module) -> nn.Module:
        reference = copy.deepcopy(model)
        path = self.config.model.path
        if is_adapter_dir(path):  # the starting policy is the base with its adapter
            from gearshift.models import load_adapter

            reference = load_adapter(reference, path, trainable=False)
        reference.eval().requires_grad_(False)
        return reference

    # ------------------------------------------------------------------ the step

    def units(self, batch: Any) -> int:
        return len(batch["index"]) * self.rl.samples_per_prompt

    def start_attempt(self) -> None:
        self._attempt = {"reward_sum": 0.0, "answers": 0, "skipped": [], "groups": []}

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        a, rl = self._attempt, self.rl
        if rl.baseline == "moving_average" and a["answers"]:
            mean = a["reward_sum"] / a["answers"]
            self.baseline = mean if self.baseline is None else \
                rl.baseline_momentum * self.baseline + (1 - rl.baseline_momentum) * mean
        in_force = self.entropy_coefficient
        self.entropy_coefficient *= rl.entropy_decay
        self.reward_errors += len(a["skipped"])
        self.step_skipped = list(a["skipped"])
        self.recent_groups = list(a["groups"])
        return {"rl/entropy_coefficient": in_force}

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        rl = self.rl
        raw = getattr(model, "module", model)
        policy = raw.policy if isinstance(raw, PolicyWithValueHead) else raw
        indices = batch["index"].tolist()
        prompts = [self.train_prompts[i] for i in indices]
        rollout = sample_rollout(policy, self.tokenizer, [self._ids(i) for i in indices],
                                 samples=rl.samples_per_prompt,
                                 max_new_tokens=rl.max_new_tokens,
                                 temperature=rl.temperature, top_p=rl.top_p)
        rewards, valid = self._rewards(prompts, rollout)
        logits, values = policy_forward(model, raw, rollout)
        logp_all = F.log_softmax(logits.float() / rl.temperature, dim=-1)
        logp = logp_all.gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1)
        mask = rollout.mask * valid.unsqueeze(-1)
        n_tokens = mask.sum().clamp(min=1.0)
        advantages, raw_std, returns = self._advantages(rewards, valid, mask, values)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        per_token = -advantages * logp - self.entropy_coefficient * entropy
        metrics: dict[str, float] = {
            "rl/policy_loss": float((-advantages * logp.detach() * mask).sum() / n_tokens),
            "rl/entropy": float((entropy.detach() * mask).sum() / n_tokens),
            "rl/advantage_std": raw_std,
        }
        if self.reference is not None:
            kl = self._kl(logp, rollout)
            per_token = per_token + rl.kl_coefficient * kl
            metrics["rl/kl"] = float((kl.detach() * mask).sum() / n_tokens)
        if values is not None and returns is not None:
            value_loss = (values - returns) ** 2
            per_token = per_token + rl.value_loss_coefficient * value_loss
            metrics["rl/value_loss"] = float((value_loss.detach() * mask).sum() / n_tokens)
        loss = (per_token * mask).sum() / n_tokens
        n = rewards.numel()
        scored = rewards.reshape(-1)[valid.bool()]
        metrics.update({
            "rl/reward_mean": float(scored.mean()) if len(scored) else 0.0,
            "rl/reward_std": float(scored.std(unbiased=False)) if len(scored) else 0.0,
            "rl/accuracy": float((scored == 1.0).float().mean()) if len(scored) else 0.0,
            "rl/response_length": float(rollout.mask.sum() / n),
        })
        if rl.on_reward_error == "skip":
            metrics["rl/skipped_answers"] = float(1.0 - valid.mean())
        self._attempt["reward_sum"] += float(scored.sum())
        self._attempt["answers"] += len(scored)
        self._keep_groups(prompts, rollout, rewards, valid)
        # Summed over the micro-batch's answers (the loop divides by the step's answers).
        return LossOutput(loss * n, n, {k: v * n for k, v in metrics.items()})

    def _ids(self, index: int) -> list[int]:
        if index not in self._prompt_ids:
            ids = render_ids(self.tokenizer, self.train_prompts[index].messages,
                             add_generation_prompt=True)
            self._prompt_ids[index] = ids[-self.config.data.seq_len:]
        return self._prompt_ids[index]

    def _rewards(self, prompts: Sequence[GenerationPrompt], rollout: Rollout,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prompts, samples]`` rewards and whether each answer was scored (1) or dropped."""
        s = self.rl.samples_per_prompt
        rewards = torch.zeros(len(prompts), s)
        valid = torch.ones(len(prompts), s)
        for i, p in enumerate(prompts):
            for j in range(s):
                completion = rollout.texts[i * s + j]
                try:
                    rewards[i, j] = self._reward(p, completion)
                except RewardError as exc:
                    if self.rl.on_reward_error != "skip":
                        raise
                    valid[i, j] = 0.0
                    self._attempt["skipped"].append(str(exc))
        device = rollout.tokens.device
        return rewards.to(device), valid.reshape(-1).to(device)

    def _reward(self, prompt: GenerationPrompt, completion: str) -> float:
        assert self.reward_fn is not None
        return call_reward(self.reward_fn, self.rl.reward.label, prompt.question, completion,
                           prompt.reference)

    def _advantages(self, rewards: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                    values: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """Per-token advantages ``[answers, tokens]`` (detached), their std before
        normalisation, and the value head's targets (None without one)."""
        rl = self.rl
        ok = valid.reshape(rewards.shape)
        if values is not None:
            token_rewards = torch.zeros_like(mask)
            last = (mask.sum(-1).long() - 1).clamp(min=0)
            token_rewards[torch.arange(len(last)), last] = rewards.reshape(-1)
            adv, returns = generalized_advantage_estimation(
                token_rewards, values.detach(), mask, gamma=rl.gamma,
                lam=rl.gae_lambda if rl.use_gae else 1.0)
            return (*normalised(adv, mask.bool(), rl.normalize_advantages), returns)
        if rl.baseline == "leave_one_out" and bool(ok.all()):
            base = leave_one_out_baseline(rewards)
        elif rl.baseline == "leave_one_out":  # some answers dropped: the others that remain
            n_ok = ok.sum(-1, keepdim=True)
            others = ((rewards * ok).sum(-1, keepdim=True) - rewards) / (n_ok - 1).clamp(min=1)
            base = torch.where(n_ok > 1, others, rewards)  # alone: nothing to compare with
        elif rl.baseline == "moving_average":
            scored = rewards[ok.bool()]
            mean = float(scored.mean()) if len(scored) else 0.0
            base = torch.full_like(rewards, mean if self.baseline is None else self.baseline)
        else:
            base = torch.zeros_like(rewards)
        adv, std = normalised((rewards - base).reshape(-1), valid.bool(),
                               rl.normalize_advantages)
        return adv.unsqueeze(-1).expand_as(mask), std, None

    def _kl(self, logp: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        ref = self.reference
        assert ref is not None
        device = logp.device
        if next(ref.parameters()).device != device:
            ref.to(device)
        with torch.no_grad():
            logits = ref(input_ids=rollout.sequences, attention_mask=rollout.attention,
                         position_ids=rollout.positions).logits[:, rollout.prompt_len - 1:-1]
            ref_all = F.log_softmax(logits.float() / self.rl.temperature, dim=-1)
            ref_logp = ref_all.gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1)
        q = ref_logp - logp
        return q.exp() - q - 1.0

    def _keep_groups(self, prompts: Sequence[GenerationPrompt], rollout: Rollout,
                     rewards: torch.Tensor, valid: torch.Tensor) -> None:
        s, kept = self.rl.samples_per_prompt, self._attempt["groups"]
        for i, p in enumerate(prompts[: max(0, self._keep_samples() - len(kept))]):
            kept.append({"kind": "sampled", "prompt": p.question, "reference": p.reference,
                         "completions": rollout.texts[i * s:(i + 1) * s],
                         "rewards": [float(r) if v else None for r, v in
                                     zip(rewards[i].tolist(), valid[i * s:(i + 1) * s].tolist(),
                                         strict=True)]})

    def _keep_samples(self) -> int:
        gen = self.config.eval.generate
        return gen.keep_samples if gen is not None else 4

    # ------------------------------------------------------------------ validation

    def evaluate(self, model: nn.Module, eval_data: Sequence[Any], loop: EvalLoop,
                 ) -> dict[str, float]:
        raw = getattr(model, "module", model)
        policy = raw.policy if isinstance(raw, PolicyWithValueHead) else raw
        gen = self.config.eval.generate
        prompts = self.prompts[: gen.num_samples] if gen is not None else self.prompts
        answers = generate_answers(policy, self.tokenizer, prompts,
                                   max_new_tokens=self.rl.max_new_tokens,
                                   batch_size=gen.batch_size if gen is not None else 64,
                                   max_prompt_tokens=self.config.data.seq_len)
        rewards = []
        for p, a in zip(prompts, answers, strict=True):
            try:
                rewards.append(self._reward(p, a))
            except RewardError:
                if self.rl.on_reward_error != "skip":
                    raise
                rewards.append(0.0)  # an answer the reward cannot score is not a right one
        exact = [self._score(a, p.reference) for p, a in zip(prompts, answers, strict=True)]
        keep = self._keep_samples()
        self.samples = [{"kind": "validation", "prompt": p.question, "completion": a,
                         "reference": p.reference, "reward": r}
                        for p, a, r in list(zip(prompts, answers, rewards, strict=True))[:keep]]
        self.samples += self.recent_groups
        return {"eval/reward": sum(rewards) / len(rewards),
                "eval/exact_match": sum(exact) / len(exact)}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baseline": self.baseline,
                "entropy_coefficient": self.entropy_coefficient, "best_reward": self.best_reward,
                "best_step": self.best_step, "bad_validations": self.bad_validations,
                "last_validation_step": self.last_validation_step,
                "reward_errors": self.reward_errors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.baseline = state.get("baseline")
        self.entropy_coefficient = float(state.get("entropy_coefficient",
                                                   self.rl.entropy_coefficient))
        self.best_reward = state.get("best_reward")
        self.best_step = state.get("best_step")
        self.bad_validations = int(state.get("bad_validations", 0))
        self.last_validation_step = state.get("last_validation_step")
        self.reward_errors = int(state.get("reward_errors", 0))


def _prompt(chat: list[dict[str, str]]) -> GenerationPrompt:
    end = last_assistant(chat)
    return GenerationPrompt(chat[:end], chat[end]["content"])
