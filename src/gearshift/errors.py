"""Errors a user can cause.

Every exception here carries a message that says what was wrong and how to fix it. The CLI turns
any :class:`GearshiftError` into one clear block of text on stderr and exit code 2, with no
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class GearshiftError(Exception):
    """Base class of every error a user can cause (bad config, data, checkpoint, model, CLI)."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One problem found while validating input: where it is and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def dedupe_problems(problems: Iterable[Problem]) -> list[Problem]:
    """The problems in order, each (path, message) once."""
    return list(dict.fromkeys(problems))


class ConfigError(GearshiftError):
    """The configuration is invalid. Holds *every* problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem | str], source: str | None = None) -> None:
        self.problems = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        self.source = source
        where = f" in {source}" if source else ""
        n = len(self.problems)
        head = f"invalid configuration{where} ({n} problem{'s' if n != 1 else ''}):"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class DataError(GearshiftError):
    """A data file is missing, unreadable or malformed (the message names file and line)."""


class CheckpointError(GearshiftError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class RunDirError(GearshiftError):
    """A run directory is missing a file, or a file in it is corrupt (naming file and line)."""


class ModelError(GearshiftError):
    """A model directory is missing files or cannot be loaded."""


class UsageError(GearshiftError):
    """A command-line argument is wrong."""
