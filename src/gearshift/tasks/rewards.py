"""Reward functions of ``task: reinforce``: a verifiable score of one sampled answer.

A reward is a callable ``(prompt, completion, reference) -> float``. The ``rl.reward`` section
names a built-in one (``exact_match``: the synthetic task's own scorer; ``contains``;
``regex``) or imports a user's function by its dotted name (``package.module:name``; the name
is imported, never evaluated). Every call goes through :func:`call_reward`, which turns an
exception, a NaN or a value that is not a number into a :class:`RewardError` naming the
function.

Example:
    >>> fn = build_reward(RewardSpec(name="contains"), exact=lambda c, r: float(c == r))
    >>> fn("2+2=", "it is 4", "4")
    1.0
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gearshift.data.synthetic import normalize
from gearshift.errors import GearshiftError

RewardFn = Callable[[str, str, str], float]


class RewardError(GearshiftError):
    """A reward function raised, or returned something that is not a finite number."""


class RewardSpec(BaseModel):
    """The ``rl.reward`` section: a built-in reward by ``name``, or a ``function`` to import."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["exact_match", "contains", "regex"] | None = Field(
        None, description="exact_match = the synthetic task's scorer (whitespace-normalised "
        "equality for JSONL data); contains = the reference appears in the answer; regex = "
        "the answer matches `pattern`")
    function: str | None = Field(
        None, description="'package.module:name' of a callable (prompt, completion, "
        "reference) -> float, imported by name")
    pattern: str | None = Field(
        None, description="regex reward: searched in the answer; {reference} stands for the "
        "reference, escaped")
    ignore_case: bool = Field(False, description="contains / regex: compare case-insensitively")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.name is None) == (self.function is None):
            raise ValueError("give exactly one of name (exact_match, contains, regex) or "
                             "function ('package.module:name')")
        if self.name == "regex" and not self.pattern:
            raise ValueError("name: regex needs a pattern, e.g. pattern: '^\\s*{reference}\\s*$'")
        return self

    @field_validator("function")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"expected 'package.module:name', got {value!r}")
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value.replace("{reference}", "x"))
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression ({exc})") \
                    from None
        return value

    @property
    def label(self) -> str:
        """How errors name this reward."""
        return f"reward function {self.function!r}" if self.function else \
            f"reward {self.name!r}"


@dataclass(frozen=True)
class _Contains:
    ignore_case: bool

    def __call__(self, prompt: str, completion: str, reference: str) -> float:
        a, b = normalize(completion), normalize(reference)
        if self.ignore_case:
            a, b = a.lower(), b.lower()
        return 1.0 if b in a else 0.0


@dataclass(frozen=True)
class _Regex:
    pattern: str
    ignore_case: bool

    def __call__(self, prompt: str, completion: str, reference: str) -> float:
        pattern = self.pattern.replace("{reference}", re.escape(reference))
        flags = re.IGNORECASE if self.ignore_case else 0
        return 1.0 if re.search(pattern, completion, flags) else 0.0


def build_reward(spec: RewardSpec, exact: Callable[[str, str], float]) -> RewardFn:
    """The reward callable of ``spec``; ``exact(completion, reference)`` is the task's scorer.

    Raises:
        RewardError: when ``spec.function`` cannot be imported or is not callable.
    """
    if spec.name == "exact_match":
        return lambda prompt, completion, reference: exact(completion, reference)
    if spec.name == "contains":
        return _Contains(spec.ignore_case)
    if spec.name == "regex":
        assert spec.pattern is not None  # validated
        return _Regex(spec.pattern, spec.ignore_case)
    assert spec.function is not None  # validated
    module_name, _, attr = spec.function.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or any error raised while importing it
        raise RewardError(f"rl.reward.function: cannot import {module_name!r} "
                          f"({type(exc).__name__}: {exc}); check the module is on PYTHONPATH"
                          ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"rl.reward.function: {module_name!r} has no callable {attr!r}; "
                          "it must be a function (prompt, completion, reference) -> float")
    return fn


def call_reward(fn: RewardFn, label: str, prompt: str, completion: str, reference: str,
                ) -> float:
    """``fn(prompt, completion, reference)`` as a finite float.

    Raises:
        RewardError: naming ``label``, when ``fn`` raises or returns NaN, an infinity or
            something that is not a number.
    """
    fix = "fix it, or set rl.on_reward_error: skip to drop such answers"
    try:
        value: Any = fn(prompt, completion, reference)
    except Exception as exc:
        raise RewardError(f"{label} raised {type(exc).__name__}: {exc} (on completion "
                          f"{completion!r}); {fix}") from None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # a 0-d tensor or numpy scalar
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{label} returned {value!r} ({type(value).__name__}), not a "
                          f"number (on completion {completion!r}); {fix}")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"{label} returned {value} (on completion {completion!r}); {fix}")
    return value
