"""task: reinforce — the pinned functions, every knob, reward errors, early stopping, the best
policy, the export, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import gearshift as gs
from conftest import kill_at_checkpoint
from gearshift.tasks.reinforce import (
    ReinforceTask,
    generalized_advantage_estimation,
    leave_one_out_baseline,
)
from gearshift.tasks.rewards import RewardError, RewardSpec, build_reward, call_reward
from gearshift.tasks.rl_config import RlSection
from gearshift.tasks.rollout import sample_rollout
from gearshift.tasks.value_head import PolicyWithValueHead, ValueHeadTransform

REWARDS = '''
import math
def constant(prompt, completion, reference):
    return 1.0
def zero(prompt, completion, reference):
    return 0.0
def picky(prompt, completion, reference):
    if len(completion) % 2:
        raise ValueError("odd answer")
    return 1.0
def nan(prompt, completion, reference):
    return math.nan
def word(prompt, completion, reference):
    return "yes"
def first_digit(prompt, completion, reference):
    return 1.0 if completion[:1] == reference[:1] else 0.0
'''


@pytest.fixture
def rewards_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of reward functions importable by name (``rl_rewards:NAME``)."""
    (tmp_path / "rl_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rl_rewards"


def rl_config(root: Path, name: str = "rl", **sections: Any) -> dict[str, Any]:
    """A ~20k-parameter chat model answering 1-digit additions: seconds per run on a CPU."""
    cfg: dict[str, Any] = {
        "task": "reinforce", "name": name, "seed": 5, "output_dir": str(root / name),
        "model": {"build": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 128}},
        "data": {"source": "synthetic", "seq_len": 96, "synthetic": {
            "name": "addition", "num_train": 64, "num_eval": 6, "options": {"digits": 1}}},
        "profile": {"name": "concise", "date": "2026-12-03"},
        "rl": {"prompts_per_step": 4, "samples_per_prompt": 3, "num_episodes": 72,
               "max_new_tokens": 3, "validation_every": 2, "patience": None},
        "eval": {"generate": {"keep_samples": 2}},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 1},
        "training": {"log_every": 1},
        "checkpoint": {"every": 2, "keep_last": 10},
        "logging": {"progress_bar": False, "tensorboard": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(cfg.get(section), dict) else values
    return cfg


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open()] if path.is_file() else []


def built(cfg: dict[str, Any]) -> tuple[ReinforceTask, Any]:
    task = ReinforceTask(gs.load_config(cfg))
    return task, task.build()


# ---------------------------------------------------------------------- the pinned functions


def test_leave_one_out_baseline_against_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(5, 4, generator=gen)
    expected = torch.empty_like(rewards)
    for i in range(5):
        for j in range(4):
            others = [rewards[i, k].item() for k in range(4) if k != j]
            expected[i, j] = sum(others) / len(others)
    assert torch.allclose(leave_one_out_baseline(rewards), expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_baseline(torch.ones(3, 1))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_generalized_advantage_estimation_against_a_loop(gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(1)
    batch, tokens = 4, 6
    rewards = torch.randn(batch, tokens, generator=gen)
    values = torch.randn(batch, tokens, generator=gen)
    lengths = [6, 3, 1, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (tokens - n) for n in lengths])
    adv, ret = generalized_advantage_estimation(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        for t in range(tokens):
            if t >= n:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            # A_t = sum_k (gamma * lam)^k delta_{t+k}, the value after the last token 0.
            expected = 0.0
            for k in range(t, n):
                next_value = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * next_value - values[b, k].item()
                expected += (gamma * lam) ** (k - t) * delta
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + values[b, t].item(), abs=1e-5)
    if lam == 1.0:  # the discounted return minus the value
        b, n = 0, lengths[0]
        g = sum(gamma ** (k - 2) * rewards[b, k].item() for k in range(2, n))
        assert (adv[b, 2] + values[b, 2]).item() == pytest.approx(g, abs=1e-5)


# ---------------------------------------------------------------------- config


def test_rl_section_defaults_are_the_documented_ones() -> None:
    rl = RlSection()
    assert (rl.prompts_per_step, rl.samples_per_prompt, rl.num_episodes) == (16, 4, 10000)
    assert (rl.max_new_tokens, rl.temperature, rl.top_p) == (16, 1.0, 1.0)
    assert rl.reward.name == "exact_match" and rl.reward.function is None
    assert (rl.baseline, rl.baseline_momentum, rl.normalize_advantages) == \
        ("leave_one_out", 0.9, True)
    assert (rl.entropy_coefficient, rl.entropy_decay, rl.kl_coefficient) == (0.01, 0.995, 0.0)
    assert (rl.value_loss_coefficient, rl.use_gae, rl.gamma, rl.gae_lambda) == \
        (0.5, False, 1.0, 0.95)
    assert (rl.validation_every, rl.patience, rl.min_delta, rl.keep) == (50, 10, 0.0, "best")
    assert rl.on_reward_error == "error"


def test_config_errors_name_every_bad_rl_key_at_once(tmp_path: Path) -> None:
    bad = rl_config(tmp_path, rl={"baselin": "value", "samples_per_prompt": 1,
                                  "reward": {"name": "regex"}, "prompts_per_step": 6},
                    training={"accumulate_grad_batches": 4}, data={"source": "pydoc_topics"})
    with pytest.raises(gs.ConfigError) as err:
        gs.load_config(bad)
    text = str(err.value)
    assert "rl.baselin: unknown key (did you mean 'baseline'?)" in text
    assert "rl.reward: name: regex needs a pattern" in text
    assert "rl.prompts_per_step: 6 prompts per step cannot be split into " \
           "training.accumulate_grad_batches=4" in text
    assert "data.source: task: reinforce answers chat prompts, not 'pydoc_topics'" in text
    with pytest.raises(gs.ConfigError, match="leave_one_out needs samples_per_prompt >= 2"):
        gs.load_config(rl_config(tmp_path, rl={"samples_per_prompt": 1}))
    with pytest.raises(gs.ConfigError, match="use_gae needs the value head"):
        gs.load_config(rl_config(tmp_path, rl={"use_gae": True}))
    with pytest.raises(gs.ConfigError, match="expected 'package.module:name'"):
        gs.load_config(rl_config(tmp_path, rl={"reward": {"function": "os.system('x')"}}))


def test_steps_and_batches_follow_the_rl_section(tmp_path: Path) -> None:
    task, parts = built(rl_config(tmp_path, rl={"num_episodes": 100, "prompts_per_step": 4,
                                                "samples_per_prompt": 3}))
    t = task.config.training
    assert t.max_steps == math.ceil(100 / 12) and t.batch_size == 4 and t.eval_every == 2
    assert task.units({"index": torch.tensor([0, 1, 2, 3])}) == 12
    assert len(parts.train_data) == 64 and len(parts.eval_data) == 6
    assert task.reference is None and parts.transforms == []  # kl 0, no value head
    given, _ = built(rl_config(tmp_path, training={"max_steps": 3}))
    assert given.config.training.max_steps == 3  # training.max_steps wins


# ---------------------------------------------------------------------- rewards


def test_built_in_rewards() -> None:
    exact = build_reward(RewardSpec(name="exact_match"), lambda c, r: float(c.strip() == r))
    assert exact("1+2=", " 3 ", "3") == 1.0 and exact("1+2=", "33", "3") == 0.0
    contains = build_reward(RewardSpec(name="contains", ignore_case=True), exact)
    assert contains("q", "The answer is ABC.", "abc") == 1.0
    assert contains("q", "nothing", "abc") == 0.0
    regex = build_reward(RewardSpec(name="regex", pattern=r"^\s*{reference}\s*$"), exact)
    assert regex("q", " 1.5 ", "1.5") == 1.0 and regex("q", "105", "1.5") == 0.0


def test_reward_function_errors_name_the_function(rewards_module: str) -> None:
    for fn, message in [("picky", "raised ValueError: odd answer (on completion 'abc')"),
                        ("nan", "returned nan (on completion 'abc')"),
                        ("word", "returned 'yes' (str), not a number")]:
        spec = RewardSpec(function=f"{rewards_module}:{fn}")
        with pytest.raises(RewardError) as err:
            call_reward(build_reward(spec, lambda c, r: 0.0), spec.label, "q", "abc", "r")
        assert f"reward function '{rewards_module}:{fn}' {message}" in str(err.value)
        assert "rl.on_reward_error: skip" in str(err.value)
    with pytest.raises(RewardError, match="cannot import 'no_such_module'"):
        build_reward(RewardSpec(function="no_such_module:f"), lambda c, r: 0.0)
    with pytest.raises(RewardError, match="has no callable 'missing'"):
        build_reward(RewardSpec(function=f"{rewards_module}:missing"), lambda c, r: 0.0)


def test_a_failing_reward_stops_the_cli_run_clearly_or_is_skipped_and_counted(
        tmp_path: Path, rewards_module: str, cli) -> None:
    cfg = rl_config(tmp_path, rl={"reward": {"function": f"{rewards_module}:picky"},
                                  "num_episodes": 24})
    path = tmp_path / "rl.json"
    path.write_text(json.dumps(cfg))
    code, _, err = cli("train", str(path))
    assert code == 2 and "Traceback" not in err
    assert f"error: reward function '{rewards_module}:picky' raised ValueError: odd answer" in err
    cfg["rl"]["on_reward_error"] = "skip"
    result = gs.train(cfg)
    assert result.step == 2
    steps = [r for r in rows(result.run_dir / "metrics.jsonl") if "loss" in r]
    events = [e for e in rows(result.run_dir / "events.jsonl")
              if e["event"] == "reward_error_skipped"]
    assert events and all("odd answer" in e["first"] for e in events)
    # Each step's dropped fraction is what its events counted (12 answers per step).
    by_step = {e["step"]: e["count"] for e in events}
    for r in steps:
        assert r["rl/skipped_answers"] == pytest.approx(by_step.get(r["step"], 0) / 12)
    assert events[-1]["total"] == sum(by_step.values())


# ---------------------------------------------------------------------- the step, knob by knob


def test_sampling_is_the_policy_and_top_p_narrows_it(tmp_path: Path) -> None:
    task, parts = built(rl_config(tmp_path))
    model, tok = parts.model, parts.tokenizer
    prompts = [task._ids(i) for i in range(3)]
    torch.manual_seed(0)
    r = sample_rollout(model, tok, prompts, samples=4, max_new_tokens=5, temperature=0.7)
    assert r.tokens.shape == (12, 5) and r.mask.shape == (12, 5)
    # What the loss scores is what generate sampled: left padding and positions agree.
    with torch.no_grad():
        logits = model(input_ids=r.sequences, attention_mask=r.attention,
                       position_ids=r.positions).logits
    from transformers import GenerationConfig
    torch.manual_seed(0)
    from gearshift.tasks.generation import _left_pad
    ids, att = _left_pad(prompts, tok.pad_token_id)
    out = model.generate(input_ids=ids.repeat_interleave(4, 0),
                         attention_mask=att.repeat_interleave(4, 0),
                         generation_config=GenerationConfig(
                             max_new_tokens=5, do_sample=True, temperature=0.7, top_k=0,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             output_scores=True, return_dict_in_generate=True))
    scores = torch.stack(out.scores, 1)
    n = scores.shape[1]
    assert torch.allclose(scores, logits[:, r.prompt_len - 1:r.prompt_len - 1 + n] / 0.7,
                          atol=1e-4)  # the full softmax(logits / T): no top-k cut
    narrow = sample_rollout(model, tok, prompts, samples=4, max_new_tokens=5, top_p=1e-6)
    greedy = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=5,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    for i in range(3):
        group = narrow.texts[4 * i:4 * i + 4]
        assert len(set(group)) == 1
        assert torch.equal(narrow.tokens[4 * i, :greedy.shape[1] - ids.shape[1]],
                           greedy[i, ids.shape[1]:])


def grads_after_one_loss(task: ReinforceTask, model: torch.nn.Module) -> dict[str, Any]:
    model.zero_grad()
    out = task.loss(model, {"index": torch.tensor([0, 1, 2])})
    out.loss.backward()
    return {"out": out, "grads": {n: p.grad for n, p in model.named_parameters()}}


def test_baseline_none_with_equal_rewards_gives_zero_advantage_and_zero_gradient(
        tmp_path: Path, rewards_module: str) -> None:
    rl = {"baseline": "none", "entropy_coefficient": 0.0,
          "reward": {"function": f"{rewards_module}:constant"}}
    task, parts = built(rl_config(tmp_path, rl=rl))
    torch.manual_seed(0)
    step = grads_after_one_loss(task, parts.model)
    assert step["out"].metrics["rl/policy_loss"] == 0.0
    assert all(g is None or torch.count_nonzero(g) == 0 for g in step["grads"].values())
    # Without normalisation the reward itself is the advantage: a real gradient.
    task, parts = built(rl_config(tmp_path, rl={**rl, "normalize_advantages": False}))
    torch.manual_seed(0)
    step = grads_after_one_loss(task, parts.model)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in step["grads"].values())
    # The entropy bonus alone also moves the policy.
    task, parts = built(rl_config(tmp_path, rl={**rl, "entropy_coefficient": 0.1}))
    torch.manual_seed(0)
    step = grads_after_one_loss(task, parts.model)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in step["grads"].values())


def test_kl_reference_only_when_on_and_frozen(tmp_path: Path) -> None:
    task, _ = built(rl_config(tmp_path))
    assert task.reference is None
    cfg = rl_config(tmp_path, "kl", rl={"kl_coefficient": 0.5, "num_episodes": 48, "keep": "last"})
    result = gs.train(cfg)
    steps = [r for r in rows(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 4 and all(r["rl/kl"] >= 0 for r in steps)
    assert steps[0]["rl/kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: still the start policy
    assert steps[-1]["rl/kl"] > 0
    task, _ = built(cfg)
    start = dict(task.reference.named_parameters())
    assert all(not p.requires_grad for p in start.values())
    final = load_file(result.run_dir / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], start[k]) for k in final)  # trained away from it


def test_value_head_is_trained_checkpointed_and_not_exported(tmp_path: Path,
                                                             rewards_module: str) -> None:
    from transformers import AutoModelForCausalLM

    cfg = rl_config(tmp_path, "value", rl={"baseline": "value", "use_gae": True,
                                           "num_episodes": 48, "keep": "last",
                                           "reward": {"function": f"{rewards_module}:constant"}})
    task, parts = built(cfg)
    assert [type(t) for t in parts.transforms] == [ValueHeadTransform]
    model = ValueHeadTransform().apply(parts.model)
    torch.manual_seed(0)
    step = grads_after_one_loss(task, model)
    assert torch.count_nonzero(step["grads"]["value_head.weight"]) > 0
    assert step["out"].metrics["rl/value_loss"] > 0
    task, parts = built({**cfg, "rl": {**cfg["rl"], "value_loss_coefficient": 0.0}})
    model = ValueHeadTransform().apply(parts.model)
    torch.manual_seed(0)
    step = grads_after_one_loss(task, model)
    assert torch.count_nonzero(step["grads"]["value_head.weight"]) == 0  # only its loss moves it

    result = gs.train(cfg)
    ckpt = load_file(result.run_dir / "checkpoints" / "step-00000004" / "model.safetensors")
    assert torch.count_nonzero(ckpt["value_head.weight"]) > 0
    assert all("rl/value_loss" in r for r in rows(result.run_dir / "metrics.jsonl") if "loss" in r)
    final = load_file(result.run_dir / "final" / "model.safetensors")
    assert not any(k.startswith("value_head") for k in final)
    assert all(torch.equal(final[k], ckpt["policy." + k]) for k in final)
    loaded = AutoModelForCausalLM.from_pretrained(result.run_dir / "final")
    assert isinstance(loaded, torch.nn.Module) and not isinstance(loaded, PolicyWithValueHead)


def test_moving_average_baseline_and_entropy_decay_follow_their_formulas(
        tmp_path: Path) -> None:
    cfg = rl_config(tmp_path, rl={"baseline": "moving_average", "baseline_momentum": 0.8,
                                  "entropy_coefficient": 0.05, "entropy_decay": 0.9},
                    data={"synthetic": {"name": "addition", "num_train": 64, "num_eval": 6,
                                        "options": {"digits": 1}}})
    result = gs.train(cfg)
    steps = [r for r in rows(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # 72 episodes / 12 per step
    coefficient, expected = 0.05, []
    for _ in steps:  # multiplied by the decay after every optimizer step
        expected.append(coefficient)
        coefficient *= 0.9
    assert [r["rl/entropy_coefficient"] for r in steps] == expected
    state = json.loads((result.run_dir / "checkpoints" / "step-00000006" /
                        "trainer_state.json").read_text())["task"]
    baseline = None
    for r in steps:
        mean = r["rl/reward_mean"]
        baseline = mean if baseline is None else 0.8 * baseline + 0.2 * mean
    assert state["baseline"] == pytest.approx(baseline, abs=1e-6)
    assert state["entropy_coefficient"] == coefficient
    for r in steps:
        assert 1 <= r["rl/response_length"] <= 3 and 0 <= r["rl/accuracy"] <= 1
        assert {"rl/reward_std", "rl/advantage_std", "rl/entropy", "rl/policy_loss"} <= set(r)
        assert "rl/kl" not in r and "rl/value_loss" not in r
    samples = rows(result.run_dir / "samples.jsonl")
    sampled = [s for s in samples if s["kind"] == "sampled"]
    assert {s["step"] for s in sampled} == {2, 4, 6}
    assert all(len(s["completions"]) == 3 == len(s["rewards"]) for s in sampled)
    evals = [r["step"] for r in rows(result.run_dir / "metrics.jsonl") if "eval/reward" in r]
    assert evals == [0, 2, 4, 6]


# ---------------------------------------------------------------------- early stop, best, export


def test_early_stopping_on_a_flat_validation_reward_keeps_the_best_policy(
        tmp_path: Path, rewards_module: str) -> None:
    cfg = rl_config(tmp_path, rl={"reward": {"function": f"{rewards_module}:zero"},
                                  "patience": 2, "num_episodes": 240, "entropy_coefficient": 0.1})
    result = gs.train(cfg)
    assert result.step == 4  # validations at 2 and 4 do not beat step 0's
    events = rows(result.run_dir / "events.jsonl")
    (stop,) = [e for e in events if e["event"] == "early_stop"]
    assert stop["step"] == 4 and stop["best_step"] == 0 and stop["patience"] == 2
    assert [e["step"] for e in events if e["event"] == "best_policy"] == [0]
    # final/ is the best (here: the starting) policy, not the last one.
    best = load_file(result.run_dir / "best" / "model.safetensors")
    final = load_file(result.run_dir / "final" / "model.safetensors")
    task, parts = built(cfg)
    start = parts.model.state_dict()
    assert all(torch.equal(final[k], best[k]) and torch.equal(final[k], start[k]) for k in final)
    last = load_file(result.run_dir / "checkpoints" / "step-00000004" / "model.safetensors")
    assert any(not torch.equal(final[k], last[k]) for k in final)
    assert result.metrics["eval/best_reward"] == 0.0


def test_export_loads_with_from_pretrained_and_answers_the_same(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = gs.train(rl_config(tmp_path, rl={"keep": "last", "num_episodes": 48}))
    final = result.run_dir / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    (event,) = [e for e in rows(result.run_dir / "events.jsonl") if e["event"] == "system_prompt"]
    last = [s for s in rows(result.run_dir / "samples.jsonl")
            if s["kind"] == "validation" and s["step"] == result.step]
    assert len(last) == 2
    for sample in last:
        chat = [{"role": "system", "content": event["system_prompt"]},
                {"role": "user", "content": sample["prompt"]}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(**ids, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:].tolist(),
                            skip_special_tokens=True)
        assert answer == sample["completion"]


def test_cli_continues_an_sft_final_with_and_without_lora(tmp_path: Path, cli) -> None:
    sft = rl_config(tmp_path, "sft", eval={}, training={"max_steps": 3, "batch_size": 8,
                                                       "log_every": 1, "eval_every": None})
    sft["task"] = "sft"
    del sft["rl"]
    start = gs.train(sft).final_dir
    cfg = rl_config(tmp_path, "from_sft", rl={"num_episodes": 24, "baseline": "value"})
    path = tmp_path / "rl.json"
    path.write_text(json.dumps(cfg))
    code, out, err = cli("train", str(path), "--set", f"model.path={start}")
    assert code == 0, err
    assert "\nreward: 0." in out and "\nexact match: 0." in out and " -> " in out
    (run,) = Path(cfg["output_dir"]).iterdir()
    assert gs.load_config(str(run / "config.yaml")).model.path == str(start)
    steps = [r for r in rows(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    code, _, err = cli("train", str(path), "--set", f"model.path={start}",
                       "--set", "lora.enabled=true", "--set", "name=lora")
    assert code == 0, err
    (run,) = [d for d in Path(cfg["output_dir"]).iterdir() if d.name.startswith("lora")]
    assert (run / "final" / "adapter_config.json").is_file()
    ckpt = load_file(run / "checkpoints" / "step-00000002" / "model.safetensors")
    assert any("value_head" in k for k in ckpt) and any("lora_" in k for k in ckpt)
    assert not any("embed_tokens" in k for k in ckpt)  # the frozen base is not checkpointed


# ---------------------------------------------------------------------- exact resume


class StopAt(gs.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: gs.Trainer, metrics: dict[str, Any]) -> None:
        if trainer.step == self.step:
            trainer.should_stop = True


def strip(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory/peak_mb")}
            for r in rows(run / "metrics.jsonl")]


def same_weights(a: Path, b: Path, name: str = "model.safetensors") -> bool:
    wa, wb = load_file(a / name), load_file(b / name)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_and_resume_with_value_head_kl_and_early_stopping_is_exact(
        tmp_path: Path, rewards_module: str) -> None:
    rl = {"baseline": "value", "kl_coefficient": 0.1, "patience": 2, "num_episodes": 240,
          "reward": {"function": f"{rewards_module}:first_digit"}}
    straight = gs.train(rl_config(tmp_path, "straight", rl=rl))
    cfg = rl_config(tmp_path, "stopped", rl=rl)
    stopped = gs.train(cfg, callbacks=[StopAt(3)])
    assert stopped.step == 3
    resumed = gs.train(cfg, resume=stopped.run_dir)
    assert resumed.step == straight.step
    # The stop at step 3 ended that run with an evaluation of its own; the rest is identical.
    assert [r for r in strip(stopped.run_dir) if r["step"] != 3 or "loss" in r] == \
        strip(straight.run_dir)
    events = lambda run: [(e["step"], e["event"]) for e in rows(run / "events.jsonl")  # noqa: E731
                          if e["event"] in ("early_stop", "best_policy")]
    assert (0, "best_policy") in events(straight.run_dir)
    assert events(stopped.run_dir) == events(straight.run_dir)
    assert same_weights(straight.run_dir / "final", stopped.run_dir / "final")
    last = f"checkpoints/step-{straight.step:08d}"
    assert same_weights(straight.run_dir / last, stopped.run_dir / last)  # value head too
    state = lambda run: json.loads((run / last / "trainer_state.json").read_text())["task"]  # noqa: E731
    assert state(stopped.run_dir) == state(straight.run_dir)


def test_sigkill_and_resume_gives_the_same_rewards_metrics_and_weights(tmp_path: Path) -> None:
    rl = {"baseline": "moving_average", "num_episodes": 96, "keep": "last"}
    cfg = rl_config(tmp_path, "victim", rl=rl)
    straight = gs.train(rl_config(tmp_path, "straight", rl=rl))
    run_dir = kill_at_checkpoint(cfg, 4, tmp_path / "victim.json")

    resumed = gs.train(cfg, resume=run_dir)
    assert resumed.step == 8
    (resume,) = [e for e in rows(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert 4 <= resume["step"] < 8
    assert strip(run_dir) == strip(straight.run_dir)  # rewards, accuracy, loss, eval/reward
    assert rows(run_dir / "samples.jsonl") == rows(straight.run_dir / "samples.jsonl")
    assert same_weights(run_dir / "final", straight.run_dir / "final")
    state = lambda run: json.loads(  # noqa: E731
        (run / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())["task"]
    assert state(run_dir) == state(straight.run_dir) and state(run_dir)["baseline"] is not None


def test_the_example_config_is_valid_and_starts_from_a_model_path(cli) -> None:
    code, out, err = cli("config", "validate", "examples/reinforce.yaml")
    assert code == 0 and out.strip() == "examples/reinforce.yaml: valid", err
    code, out, _ = cli("config", "show", "examples/reinforce.yaml", "--set",
                       "model.path=runs/sft/final", "--set", "rl.baseline=value")
    shown = __import__("yaml").safe_load(out)
    assert code == 0 and shown["model"]["path"] == "runs/sft/final"
    assert shown["task"] == "reinforce" and shown["rl"]["baseline"] == "value"
    code, _, err = cli("train", "examples/reinforce.yaml", "--set", "rl.baseline=values")
    assert code == 2 and "rl.baseline" in err and "Traceback" not in err


def test_the_example_raises_the_sft_examples_task_under_its_profile() -> None:
    """examples/reinforce.yaml trains on what examples/sft_chat.yaml taught: the same synthetic
    task, split and system prompt, and its answers are long enough for that task's answers."""
    from gearshift.data.synthetic import make_examples

    sft = gs.load_config("examples/sft_chat.yaml")
    rl = gs.load_config("examples/reinforce.yaml")
    assert rl.data.model_dump() == sft.data.model_dump()
    assert rl.profile.model_dump() == sft.profile.model_dump()
    section = (rl.model_extra or {})["rl"]
    task = sft.data.synthetic
    longest = max(len(e.answer) for e in make_examples(task.name, 500, seed=0,
                                                       **task.options))
    assert section["max_new_tokens"] >= longest + 1  # the answer and its EOS (byte tokens)
    episodes = section["prompts_per_step"] * section["samples_per_prompt"]
    assert math.ceil(section["num_episodes"] / episodes) * episodes <= 10_000


def test_from_an_adapter_the_kl_reference_is_the_adapted_start(tmp_path: Path) -> None:
    from peft import PeftModel

    sft = rl_config(tmp_path, "sft_lora", eval={}, lora={"enabled": True, "r": 4},
                    optim={"learning_rate": 0.05},
                    training={"max_steps": 3, "batch_size": 8, "eval_every": None})
    sft["task"] = "sft"
    del sft["rl"]
    adapter = gs.train(sft).final_dir
    assert (adapter / "adapter_config.json").is_file()
    cfg = rl_config(tmp_path, "rl_lora", model={"path": str(adapter)},
                    rl={"kl_coefficient": 0.5, "num_episodes": 24, "keep": "last"})
    task, _ = built(cfg)
    assert isinstance(task.reference, PeftModel)
    result = gs.train(cfg)
    step = [r for r in rows(result.run_dir / "metrics.jsonl") if "loss" in r][0]
    assert step["rl/kl"] == pytest.approx(0.0, abs=1e-6)  # the start is the adapted model
    assert (result.run_dir / "final" / "adapter_config.json").is_file()
