"""What a REINFORCE run does around its steps: the best policy, early stopping, reward-error
events and ``samples.jsonl`` (the task's own callback)."""

from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING, Any

from gearshift.rundir import RunPaths
from gearshift.tasks.sft import ChatRunCallback

if TYPE_CHECKING:
    from gearshift.tasks.reinforce import ReinforceTask

BEST_DIR = "best"


class RlRunCallback(ChatRunCallback):
    """After each validation: keep the best policy in ``RUN_DIR/best/`` (``rl.keep: best``) and
    stop the run (event ``early_stop``) after ``rl.patience`` validations without an improvement
    of the validation reward larger than ``rl.min_delta``. At the end, ``final/`` becomes the
    best policy. The counters and the best score are the task's checkpointed state."""

    def __init__(self, task: ReinforceTask) -> None:
        super().__init__(task)
        self.rl_task = task

    @property
    def state_key(self) -> str:
        return "reinforce"

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        skipped = self.rl_task.step_skipped
        if skipped and trainer.is_main:
            if self.rl_task.reward_errors == len(skipped):  # the first ones of the run
                print(f"warning: {skipped[0]}; answers dropped (rl.on_reward_error: skip)",
                      file=sys.stderr)
            trainer.logger.log_event(trainer.step, "reward_error_skipped", count=len(skipped),
                                     total=self.rl_task.reward_errors, first=skipped[0])

    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        super().on_eval(trainer, metrics)
        task, rl, step = self.rl_task, self.rl_task.rl, trainer.step
        scheduled = step % rl.validation_every == 0 or step == trainer.state.total_steps
        if "eval/reward" not in metrics or not scheduled or task.last_validation_step == step:
            # Not a validation of the schedule: the end of a run stopped in between (its
            # checkpoint is already written, so counting it would fork a resumed run), or the
            # end of one stopped right after this step's validation.
            return
        task.last_validation_step = step
        reward = float(metrics["eval/reward"])
        if task.best_reward is None or reward > task.best_reward + rl.min_delta:
            task.best_reward, task.best_step, task.bad_validations = reward, step, 0
            if rl.keep == "best" and trainer.is_main:
                trainer.transforms.export(trainer.raw_model, RunPaths(trainer.run_dir).root
                                          / BEST_DIR, tokenizer=trainer.tokenizer)
                trainer.logger.log_event(step, "best_policy", reward=reward)
            return
        task.bad_validations += 1
        if rl.patience is not None and task.bad_validations >= rl.patience:
            trainer.logger.log_event(step, "early_stop", reward=reward,
                                     best_reward=task.best_reward, best_step=task.best_step,
                                     patience=rl.patience, min_delta=rl.min_delta)
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, result: Any) -> None:
        task = self.rl_task
        before = trainer.state.initial_eval or {}
        for key in ("eval/reward", "eval/exact_match"):
            if key in before:
                result.metrics[f"{key}_before"] = before[key]
        if task.best_reward is not None:
            result.metrics["eval/best_reward"] = task.best_reward
            result.metrics["rl/best_step"] = float(task.best_step or 0)
        best = RunPaths(trainer.run_dir).root / BEST_DIR
        if task.rl.keep != "best" or not trainer.is_main or not best.is_dir() \
                or result.final_dir is None:
            return
        # final/ becomes a copy of best/: written beside it, then swapped in.
        final = result.final_dir
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(best, tmp)
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
