"""Verifiable synthetic tasks: small problems whose answers can be checked exactly.

Each task draws problems from a seeded random stream, so ``make_examples`` with the same name,
seed, split and options gives the same list every time. Every possible prompt belongs to
exactly one split (a hash of the task name and the prompt decides), so the ``train`` and
``eval`` splits never share a prompt, whatever their sizes.

Example:
    >>> examples = make_examples("addition", 3, seed=0, split="eval", digits=2)
    >>> [score("addition", e.answer, e.answer) for e in examples]
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gearshift.config.extensions import register_check
from gearshift.errors import Problem, did_you_mean

SPLITS = ("train", "eval")
#: One prompt in this many belongs to the eval split.
EVAL_EVERY = 8


@dataclass(frozen=True)
class Example:
    """One problem: what the user asks and the one right answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class SyntheticTask:
    """A generator of problems and the options it accepts.

    Attributes:
        name: The registry name.
        description: One line for listings.
        draw: ``draw(rng, **options) -> Example`` for one random problem.
        options: Option name -> (default, minimum, maximum); every option is an int.
        space: ``space(**options)``: how many distinct prompts exist (to refuse impossible sizes).
    """

    name: str
    description: str
    draw: Callable[..., Example]
    options: dict[str, tuple[int, int, int]]
    space: Callable[..., int]


def _addition(rng: random.Random, digits: int) -> Example:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randint(low, 10**digits - 1), rng.randint(low, 10**digits - 1)
    return Example(f"{a}+{b}=", str(a + b))


def _reverse(rng: random.Random, length: int) -> Example:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                   for _ in range(rng.randint(2, length)))
    return Example(f"reverse {word}", word[::-1])


def _sort_digits(rng: random.Random, length: int) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, length)))
    return Example(f"sort {digits}", "".join(sorted(digits)))


def _addition_space(digits: int) -> int:
    return (10**digits - (0 if digits == 1 else 10 ** (digits - 1))) ** 2


def _strings_space(alphabet: int) -> Callable[..., int]:
    return lambda length: sum(alphabet**n for n in range(2, length + 1))


#: Task name -> :class:`SyntheticTask`.
SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    "addition": SyntheticTask("addition", "add two n-digit numbers ('12+34=' -> '46')",
                              _addition, {"digits": (2, 1, 18)}, _addition_space),
    "reverse": SyntheticTask("reverse", "reverse a word of 2..length letters "
                             "('reverse abc' -> 'cba')", _reverse, {"length": (6, 2, 32)},
                             _strings_space(26)),
    "sort_digits": SyntheticTask("sort_digits", "sort 2..length digits ('sort 3141' -> '1134')",
                                 _sort_digits, {"length": (6, 2, 32)}, _strings_space(10)),
}


def split_of(name: str, prompt: str) -> str:
    """The split a prompt belongs to: fixed by a hash of the task name and the prompt."""
    digest = hashlib.blake2b(f"{name}\x00{prompt}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") % EVAL_EVERY == 0 else "train"


def make_examples(name: str, n: int, *, seed: int, split: str = "train",
                  **options: Any) -> list[Example]:
    """``n`` problems of task ``name`` from ``split``, deterministic given ``seed``.

    Args:
        name: A key of :data:`SYNTHETIC_TASKS`.
        n: How many examples (prompts may repeat within a split, never across splits).
        seed: Seeds the draw; the same arguments give the same list.
        split: ``"train"`` or ``"eval"``.
        **options: The task's options (e.g. ``digits`` for ``addition``).

    Raises:
        ValueError: for an unknown task, split or option, or an option out of range.

    Example:
        >>> make_examples("reverse", 1, seed=3, split="train")[0].prompt.startswith("reverse ")
        True
    """
    task = _task(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    resolved = resolve_options(name, options)
    if task.space(**resolved) < 2 * EVAL_EVERY:
        raise ValueError(f"synthetic task {name!r} with {resolved} has too few distinct "
                         "problems to split into train and eval; make it larger")
    # Seeded by a string: random.Random hashes it with sha512, the same in every process.
    rng = random.Random(f"{name}:{split}:{seed}")
    out: list[Example] = []
    while len(out) < n:
        example = task.draw(rng, **resolved)
        if split_of(name, example.prompt) == split:
            out.append(example)
    return out


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, int]:
    """The task's options with defaults filled in; raises ValueError naming a bad one."""
    task = _task(name)
    problems = option_problems(name, options)
    if problems:
        raise ValueError("; ".join(f"{p.path}: {p.message}" for p in problems))
    return {key: int(options.get(key, default)) for key, (default, _, _) in task.options.items()}


def option_problems(name: str, options: Mapping[str, Any]) -> list[Problem]:
    """Every unknown option and every value out of range, each naming the option."""
    task = _task(name)
    out = []
    for key, value in options.items():
        if key not in task.options:
            valid = ", ".join(sorted(task.options)) or "none"
            out.append(Problem(str(key), f"unknown option for synthetic task {name!r}"
                               f"{did_you_mean(str(key), task.options)}; valid options: {valid}"))
            continue
        _, low, high = task.options[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            out.append(Problem(str(key), f"must be an integer in [{low}, {high}], got {value!r}"))
    return out


def normalize(text: str) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, ends stripped."""
    return " ".join(text.split())


def score(name: str, completion: str, answer: str) -> float:
    """1.0 when ``completion`` equals ``answer`` after whitespace normalisation, else 0.0.

    Example:
        >>> score("addition", " 46\\n", "46")
        1.0
    """
    _task(name)
    return 1.0 if normalize(completion) == normalize(answer) else 0.0


def _task(name: str) -> SyntheticTask:
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {name!r}{did_you_mean(name, SYNTHETIC_TASKS)};"
                         f" valid: {', '.join(sorted(SYNTHETIC_TASKS))}")
    return SYNTHETIC_TASKS[name]


@register_check
def _synthetic_config_problems(raw: Mapping[str, Any]) -> list[Problem]:
    """``data.source: synthetic`` needs ``data.synthetic`` naming a known task, valid options."""
    data = raw.get("data") if isinstance(raw, Mapping) else None
    if not isinstance(data, Mapping) or data.get("source") != "synthetic":
        return []
    out = []
    if raw.get("task", "lm") not in ("sft", "reinforce"):
        out.append(Problem("data.source", "'synthetic' makes chat conversations for task: sft "
                           "or reinforce; set task: sft"))
    section = data.get("synthetic")
    if not isinstance(section, Mapping):
        return [*out, Problem("data.synthetic", "data.source is 'synthetic' but data.synthetic "
                              "is not set; e.g. {name: addition, num_train: 2000, num_eval: 200}")]
    name = section.get("name")
    if isinstance(name, str) and name not in SYNTHETIC_TASKS:
        out.append(Problem("data.synthetic.name", f"unknown synthetic task {name!r}"
                           f"{did_you_mean(name, SYNTHETIC_TASKS)}; valid: "
                           f"{', '.join(sorted(SYNTHETIC_TASKS))}"))
    elif isinstance(name, str) and isinstance(section.get("options"), Mapping):
        out.extend(Problem(f"data.synthetic.options.{p.path}", p.message)
                   for p in option_problems(name, section["options"]))
    return out
