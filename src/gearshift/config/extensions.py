"""What upper layers add to the config: task names with their sections, and extra checks.

The config layer imports nothing above it. Layers above fill these registries when they are
imported (``gearshift.tasks`` registers its tasks, ``gearshift.transforms`` its cross-section
checks), and validation reads them, so a new task or transform needs no change here.
:func:`load_builtins` imports the built-in providers by name, once, before a validation, so
``gearshift.load_config`` knows ``task: sft`` without the caller importing the tasks first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from gearshift.errors import Problem

#: Task name -> task class (``gearshift.tasks.TASKS`` is this very dict). A class may set
#: ``config_section`` to a pydantic model: its section is ``config.<task name>`` (or
#: ``config.<section_name>`` when the class sets ``section_name``).
TASK_REGISTRY: dict[str, Any] = {}

#: Modules that register gearshift's own tasks and checks when imported.
BUILTIN_PROVIDERS: tuple[str, ...] = ("gearshift.tasks", "gearshift.transforms")
_builtins_loaded = False

#: Checks of a raw (merged) config dict that span sections owned by upper layers.
CHECKS: list[Callable[[Mapping[str, Any]], list[Problem]]] = []


def register_check(check: Callable[[Mapping[str, Any]], list[Problem]]
                   ) -> Callable[[Mapping[str, Any]], list[Problem]]:
    """Run ``check(raw_config)`` in every validation (usable as a decorator)."""
    if check not in CHECKS:
        CHECKS.append(check)
    return check


def task_sections() -> dict[str, type[BaseModel]]:
    """``{task name: section model}`` for every registered task with a section of its own."""
    return {getattr(cls, "section_name", None) or name: cls.config_section
            for name, cls in TASK_REGISTRY.items()
            if getattr(cls, "config_section", None) is not None}


def load_builtins() -> None:
    """Import :data:`BUILTIN_PROVIDERS` (once), filling the registries with the built-ins."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in BUILTIN_PROVIDERS:
            importlib.import_module(name)
