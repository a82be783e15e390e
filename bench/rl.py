"""Does REINFORCE raise held-out accuracy, and which baseline gives the quietest gradient?

The bench measures the examples' own settings. The *start* is ``examples/sft_chat.yaml``: a
chat model trained from scratch to sort digits under the ``concise`` profile, right about a
third of the time. From it, ``examples/reinforce.yaml`` (exact-match reward, leave-one-out,
temperature 0.3, LR 3e-4):

* **seeds** — for each of ``--seeds``, ``--episodes`` sampled answers; held-out greedy exact
  match before and after (the last policy, not the best one: no selection on the held-out
  set), episodes, wall time.
* **ablation** — one seed, ``--ablation-episodes`` each, baseline none, moving_average,
  leave_one_out, value, value + GAE: final held-out exact match, and the variance of the
  policy-gradient estimate: ``--grad-batches`` independent batches of sampled answers at the
  *start* policy (the same prompts and RNG seeds for every arm; value arms with the value head
  their run learned), reported as the mean squared distance of a batch's gradient from the
  mean gradient, relative to the mean gradient's squared norm.

Usage::

    nice -n 10 .venv/bin/python bench/rl.py                        # everything
    nice -n 10 .venv/bin/python bench/rl.py --episodes 0 --ablation-episodes 0   # a start only
    nice -n 10 .venv/bin/python bench/rl.py --start DIR --seeds 1 --ablation-episodes 0
    nice -n 5 /work/trl-venv/bin/python bench/rl.py --start DIR --ablation-episodes 0
                                                                   # gearshift vs TRL's RLOO

**TRL arm.** With each seed's run, the same episodes are spent by TRL's ``RLOOTrainer`` (the
closest peer: REINFORCE with a leave-one-out baseline) from the same start model, on the same
training prompts (the synthetic task's train split under the same profile's system prompt,
built by gearshift's own task), with the same reward (gearshift's exact-match scorer wrapped as
a TRL reward function), the same prompts per step, answers per prompt, LR and schedule,
temperature, answer length, AdamW betas and gradient clipping. Both arms' final models are
scored by one function (:func:`held_out_exact_match`: the task's own greedy validation on the
held-out prompts). TRL is not a dependency of gearshift: the arm runs only when ``trl`` is
importable, and is skipped with the reason otherwise (``--no-trl`` turns it off). Install it in
a virtualenv of its own, so that the project's stays as it is::

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0      # the CPU build the project uses
    /work/trl-venv/bin/pip install -e . trl           # gearshift (editable) and TRL

On a quiet 2-core machine the start takes about 15 s and one REINFORCE run of 9,984 episodes
about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

import gearshift as gs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROFILE_DATE = "2026-12-03"  # one date for the start and every run: the same system prompt
QUIET = {"progress_bar": False, "tensorboard": False}

ARMS = {"none": {"baseline": "none"}, "moving_average": {"baseline": "moving_average"},
        "leave_one_out": {"baseline": "leave_one_out"}, "value": {"baseline": "value"},
        "value+GAE": {"baseline": "value", "use_gae": True}}


def example(name: str) -> dict[str, Any]:
    """An example config as a dict (the bench measures the examples' own settings)."""
    cfg = yaml.safe_load((EXAMPLES / name).read_text())
    cfg["profile"] = {**cfg.get("profile", {}), "date": PROFILE_DATE}
    cfg["logging"] = {**cfg.get("logging", {}), **QUIET}
    return cfg


def quiet_train(cfg: dict[str, Any]) -> tuple[gs.RunResult, float]:
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        result = gs.train(cfg)
    return result, time.perf_counter() - start


def sft_start(out: Path, steps: int | None) -> Path:
    """``examples/sft_chat.yaml`` (its own steps unless ``steps`` is given)."""
    cfg = example("sft_chat.yaml")
    cfg.update(name="start", output_dir=str(out))
    if steps is not None:
        cfg["training"]["max_steps"] = steps
    cfg["checkpoint"] = {"every": 100_000}
    result, wall = quiet_train(cfg)
    print(f"start: examples/sft_chat.yaml, {result.step} steps in {wall:.0f}s, held-out exact "
          f"match {result.metrics['eval/exact_match']:.3f}", flush=True)
    assert result.final_dir is not None
    return result.final_dir


LR: float | None = None  # --lr (None: the example's)


def rl_config(out: Path, start: Path, seed: int, name: str, episodes: int,
              **rl: Any) -> dict[str, Any]:
    """``examples/reinforce.yaml`` at ``episodes`` episodes, validated only before and after,
    keeping the last policy (no selection on the held-out set)."""
    cfg = example("reinforce.yaml")
    cfg.update(name=name, seed=seed, output_dir=str(out), model={"path": str(start)})
    cfg["rl"].update(num_episodes=episodes, validation_every=1000, patience=None, keep="last",
                     **rl)
    if LR is not None:
        cfg["optim"]["learning_rate"] = LR
    cfg["checkpoint"] = {"every": 100_000}
    return cfg


def rl_run(cfg: dict[str, Any]) -> dict[str, Any]:
    result, wall = quiet_train(cfg)
    m, rl = result.metrics, cfg["rl"]
    episodes = result.step * rl["prompts_per_step"] * rl["samples_per_prompt"]
    return {"before": m["eval/exact_match_before"], "after": m["eval/exact_match"],
            "steps": result.step, "episodes": episodes, "wall_s": wall,
            "run_dir": str(result.run_dir), "final_dir": str(result.final_dir)}


def held_out_exact_match(cfg: dict[str, Any], model_dir: Path | str) -> float:
    """Greedy exact match of the model in ``model_dir`` on the held-out prompts of ``cfg``.

    The reinforce task's own validation (``eval/exact_match``), the same for every arm: the
    prompts under the profile's system prompt, ``rl.max_new_tokens`` greedy tokens, the
    synthetic task's scorer.
    """
    from gearshift.tasks.reinforce import ReinforceTask

    cfg = {**cfg, "model": {"path": str(model_dir)}}
    with contextlib.redirect_stderr(io.StringIO()):
        task = ReinforceTask(gs.load_config(cfg))
        model = task.build().model.eval()
    with torch.no_grad():
        return task.evaluate(model, [], None)["eval/exact_match"]  # type: ignore[arg-type]


def trl_unavailable() -> str | None:
    """Why the TRL arm cannot run here (None when it can)."""
    try:
        import trl
        from trl import RLOOConfig, RLOOTrainer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- any import failure is a reason to skip
        return f"trl is not importable ({type(exc).__name__}: {exc})"
    return None if trl.__version__ else "trl has no version"


def trl_run(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """TRL's RLOOTrainer on what ``cfg`` describes: its start model, training prompts, reward,
    episodes, prompts per step x answers per prompt, LR schedule, temperature and answer length.
    Returns the final model's directory and the wall time (loading, training, saving)."""
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from gearshift.tasks.reinforce import ReinforceTask

    begin = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # gearshift builds the prompts and reward
        task = ReinforceTask(gs.load_config(cfg))
        task.build()
    rl, prompts = task.rl, task.train_prompts
    episodes_per_step = rl.prompts_per_step * rl.samples_per_prompt
    steps = max(1, -(-rl.num_episodes // episodes_per_step))

    def exact_match(prompts: list[Any], completions: list[Any], index: list[int],
                    **_: Any) -> list[float]:
        """gearshift's reward of each answer (its exact-match scorer) as a TRL reward."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task._reward(task.train_prompts[i], t) for i, t in zip(index, texts, strict=True)]

    dataset = Dataset.from_list([{"prompt": p.messages, "index": i}
                                 for i, p in enumerate(prompts)])
    start = cfg["model"]["path"]
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(start)
    tokenizer.padding_side = "left"
    with warnings.catch_warnings():  # TRL's own defaults name deprecated arguments
        warnings.simplefilter("ignore", FutureWarning)
        args = RLOOConfig(
            output_dir=str(out / f"trl-{cfg['name']}"), seed=cfg["seed"], max_steps=steps,
            per_device_train_batch_size=episodes_per_step, gradient_accumulation_steps=1,
            num_generations=rl.samples_per_prompt, max_completion_length=rl.max_new_tokens,
            temperature=rl.temperature, top_p=rl.top_p, beta=rl.kl_coefficient,
            normalize_advantages=rl.normalize_advantages,
            learning_rate=cfg["optim"]["learning_rate"], lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},  # gearshift: min_lr_ratio 0.1
            warmup_steps=cfg["schedule"]["warmup_steps"], adam_beta1=0.9, adam_beta2=0.95,
            weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,  # as gearshift's
            use_cpu=True, bf16=False, fp16=False,
            report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True,
            dataloader_num_workers=0)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        trainer = RLOOTrainer(model=model, reward_funcs=exact_match, args=args,
                              train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
    final = out / f"trl-{cfg['name']}" / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"final_dir": str(final), "steps": trainer.state.global_step,
            "episodes": trainer.state.global_step * episodes_per_step,
            "wall_s": time.perf_counter() - begin, "trl_version": trl.__version__,
            "train_reward": rewards}


def gradient_variance(cfg: dict[str, Any], value_head: dict[str, torch.Tensor] | None,
                      batches: int) -> float:
    """E||g - mean g||^2 / ||mean g||^2 over ``batches`` batches at the start policy."""
    from gearshift.tasks.reinforce import ReinforceTask
    from gearshift.tasks.value_head import ValueHeadTransform

    with contextlib.redirect_stderr(io.StringIO()):
        task = ReinforceTask(gs.load_config(cfg))
        parts = task.build()
    model = parts.model
    if value_head is not None:
        model = ValueHeadTransform().apply(model)
        model.value_head.load_state_dict(value_head)
    params = [p for n, p in model.named_parameters() if not n.startswith("value_head")]
    grads = []
    for b in range(batches):
        torch.manual_seed(10_000 + b)
        index = torch.randperm(len(parts.train_data))[:16]
        model.zero_grad()
        task.start_attempt()
        task.loss(model, {"index": index}).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
    g = torch.stack(grads)
    mean = g.mean(0)
    return float(((g - mean) ** 2).sum(1).mean() / (mean ** 2).sum())


def side_by_side(cfg: dict[str, Any], start: Path, ours: dict[str, Any], out: Path,
                 ) -> dict[str, Any]:
    """The TRL arm on ``cfg``; both arms' held-out exact match by one function, printed."""
    t = trl_run(cfg, out)
    tick = time.perf_counter()
    before = held_out_exact_match(cfg, start)
    eval_s = time.perf_counter() - tick
    rows = {"gearshift reinforce": {**ours, "after": held_out_exact_match(cfg, ours["final_dir"])},
            f"TRL {t['trl_version']} RLOO": {**t, "after": held_out_exact_match(cfg, t["final_dir"])}}
    rl = cfg["rl"]
    print(f"seed {cfg['seed']}, side by side ({rl['prompts_per_step']} prompts x "
          f"{rl['samples_per_prompt']} answers per step, LR {cfg['optim']['learning_rate']:g}, "
          f"temperature {rl['temperature']:g}); held-out greedy exact match:", flush=True)
    print(f"  {'arm':<22} {'before':>7} {'after':>7} {'episodes':>9} {'wall':>7}")
    for name, r in rows.items():
        print(f"  {name:<22} {before:7.3f} {r['after']:7.3f} {r['episodes']:9d} "
              f"{r['wall_s']:6.0f}s")
    ratio = rows[f"TRL {t['trl_version']} RLOO"]["wall_s"] / ours["wall_s"]
    print(f"  wall time TRL / gearshift: {ratio:.2f}x (gearshift's includes its two held-out "
          f"validations, before and after; one took {eval_s:.0f}s here)", flush=True)
    return {"before": before, "eval_s": eval_s, "arms": {k: {"after": v["after"], "episodes": v["episodes"],
                                            "wall_s": v["wall_s"]} for k, v in rows.items()},
            "wall_ratio": ratio, "trl_train_reward": t["train_reward"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="TRL arm: TRL's RLOOTrainer on the same start, prompts, reward and episodes, run "
               "when trl is importable\n(it is not a dependency of gearshift). Install it in a "
               "virtualenv of its own and run the bench with it:\n"
               "  python3 -m venv /work/trl-venv\n"
               "  /work/trl-venv/bin/pip install torch==2.13.0\n"
               "  /work/trl-venv/bin/pip install -e . trl\n"
               "  /work/trl-venv/bin/python bench/rl.py --start DIR --ablation-episodes 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="steps of the start (default: examples/sft_chat.yaml's)")
    parser.add_argument("--episodes", type=int, default=9_984)
    parser.add_argument("--ablation-episodes", type=int, default=3200)
    parser.add_argument("--grad-batches", type=int, default=12)
    parser.add_argument("--start", type=Path, default=None, help="a start model (skips sft)")
    parser.add_argument("--lr", type=float, default=None, help="REINFORCE's learning rate "
                        "(both arms; default: examples/reinforce.yaml's)")
    parser.add_argument("--no-trl", action="store_true",
                        help="no TRL arm (it runs with each seed when trl is importable)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    globals()["LR"] = args.lr
    why_no_trl = "--no-trl" if args.no_trl else trl_unavailable()
    out = Path(tempfile.mkdtemp(prefix="gearshift-bench-rl-"))
    begin = time.perf_counter()
    start = args.start or sft_start(out, args.sft_steps)
    if not args.seeds or not (args.episodes or args.ablation_episodes):
        print(f"start model: {start}")
        return
    report: dict[str, Any] = {"seeds": {}, "ablation": {}, "trl": {}}
    if args.episodes and why_no_trl:
        print(f"TRL arm skipped: {why_no_trl}"
              + ("" if args.no_trl else "; --help says how to install it"), flush=True)
    for seed in args.seeds if args.episodes else []:
        cfg = rl_config(out, start, seed, f"seed{seed}", args.episodes)
        r = rl_run(cfg)
        report["seeds"][seed] = r
        print(f"seed {seed}: exact match {r['before']:.3f} -> {r['after']:.3f} "
              f"({100 * (r['after'] - r['before']):+.1f} points), {r['episodes']} episodes, "
              f"{r['wall_s']:.0f}s", flush=True)
        if not why_no_trl:
            report["trl"][seed] = side_by_side(cfg, start, r, out)
    if len(report["trl"]) > 1:
        print("over all seeds (mean held-out exact match after; total wall):")
        for arm in next(iter(report["trl"].values()))["arms"]:
            rows = [t["arms"][arm] for t in report["trl"].values()]
            print(f"  {arm:<22} {statistics.mean(r['after'] for r in rows):.3f}  "
                  f"{sum(r['wall_s'] for r in rows):.0f}s", flush=True)
        print(f"  mean before {statistics.mean(t['before'] for t in report['trl'].values()):.3f}",
              flush=True)
    if report["seeds"]:
        gains = [100 * (r["after"] - r["before"]) for r in report["seeds"].values()]
        print(f"mean gain {statistics.mean(gains):+.1f} points over {len(gains)} seeds "
              f"(min {min(gains):+.1f})", flush=True)
    if args.ablation_episodes:
        for arm, rl in ARMS.items():
            cfg = rl_config(out, start, args.seeds[0], arm.replace("+", "_"),
                            args.ablation_episodes, **rl)
            r = rl_run(cfg)
            head = None
            if rl["baseline"] == "value":
                from safetensors.torch import load_file

                ckpt = sorted(Path(r["run_dir"], "checkpoints").glob("step-*"))[-1]
                weights = load_file(ckpt / "model.safetensors")
                head = {k.removeprefix("value_head."): v for k, v in weights.items()
                        if k.startswith("value_head.")}
            r["grad_variance"] = gradient_variance(cfg, head, args.grad_batches)
            report["ablation"][arm] = r
            print(f"{arm:>15}: exact match {r['before']:.3f} -> {r['after']:.3f}, relative "
                  f"gradient variance {r['grad_variance']:.2f}, {r['wall_s']:.0f}s", flush=True)
    print(f"total {time.perf_counter() - begin:.0f}s; runs in {out}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
