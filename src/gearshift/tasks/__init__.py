"""Tasks: what a run trains and how it is judged, by name.

``TASKS`` maps a config's ``task:`` name to its :class:`Task` class. Register a new one with
``TASKS["name"] = MyTask``; the config then accepts ``task: name`` (and, when the class sets
``config_section``, a top-level ``name:`` section validated with the rest of the config).
"""

from gearshift.config.extensions import TASK_REGISTRY
from gearshift.tasks.base import EvalLoop, LossOutput, Task, TaskParts, TokenWeightedLoss
from gearshift.tasks.lm import CausalLMLoss, LMTask, build_causal_lm
from gearshift.tasks.reinforce import ReinforceTask, RlSection
from gearshift.tasks.sft import SftSection, SftTask

#: Task name -> class. The same dict the config validates ``task:`` against.
TASKS = TASK_REGISTRY
TASKS.setdefault(LMTask.name, LMTask)
TASKS.setdefault(SftTask.name, SftTask)
TASKS.setdefault(ReinforceTask.name, ReinforceTask)

__all__ = ["TASKS", "CausalLMLoss", "EvalLoop", "LMTask", "LossOutput", "ReinforceTask",
           "RlSection", "SftSection", "SftTask", "Task", "TaskParts", "TokenWeightedLoss",
           "build_causal_lm"]
