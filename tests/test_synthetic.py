"""Verifiable synthetic tasks: deterministic, checkable, and train / eval never share a prompt."""

from __future__ import annotations

import pytest

import gearshift as gs
from gearshift.data.synthetic import SYNTHETIC_TASKS, make_examples, score
from gearshift.errors import ConfigError


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_train_and_eval_never_share_a_prompt(name: str) -> None:
    train = make_examples(name, 10_000, seed=0, split="train")
    evals = make_examples(name, 10_000, seed=0, split="eval")
    assert len(train) == len(evals) == 10_000
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert len({e.prompt for e in evals}) > 100  # a real variety, not one prompt repeated


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_deterministic_given_the_seed(name: str) -> None:
    a = make_examples(name, 50, seed=3, split="train")
    assert a == make_examples(name, 50, seed=3, split="train")
    assert a != make_examples(name, 50, seed=4, split="train")


def test_answers_are_right() -> None:
    for e in make_examples("addition", 200, seed=1, split="train", digits=3):
        a, b = e.prompt.removesuffix("=").split("+")
        assert len(a) == len(b) == 3 and int(e.answer) == int(a) + int(b)
    for e in make_examples("reverse", 200, seed=1, split="eval", length=5):
        word = e.prompt.removeprefix("reverse ")
        assert 2 <= len(word) <= 5 and e.answer == word[::-1]
    for e in make_examples("sort_digits", 200, seed=1, split="train"):
        assert e.answer == "".join(sorted(e.prompt.removeprefix("sort ")))


def test_score_is_exact_match_after_whitespace_normalisation() -> None:
    assert score("addition", " 46\n", "46") == 1.0
    assert score("reverse", "c  b a", "c b a") == 1.0
    assert score("addition", "47", "46") == 0.0
    assert score("addition", "466", "46") == 0.0
    assert score("sort_digits", "", "1") == 0.0


def test_bad_names_and_options_are_named() -> None:
    with pytest.raises(ValueError, match="unknown synthetic task 'adition'.*'addition'"):
        make_examples("adition", 1, seed=0)
    with pytest.raises(ValueError, match="digit.*valid options: digits"):
        make_examples("addition", 1, seed=0, digit=2)
    with pytest.raises(ValueError, match=r"digits: must be an integer in \[1, 18\]"):
        make_examples("addition", 1, seed=0, digits=0)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        make_examples("addition", 1, seed=0, split="test")


def test_config_checks_the_synthetic_section() -> None:
    with pytest.raises(ConfigError) as err:
        gs.load_config({"task": "sft", "data": {"source": "synthetic", "synthetic": {
            "name": "addition", "options": {"digits": 99, "width": 1}}}})
    text = str(err.value)
    assert "data.synthetic.options.digits: must be an integer in [1, 18], got 99" in text
    assert "data.synthetic.options.width: unknown option" in text
    with pytest.raises(ConfigError, match="data.synthetic: data.source is 'synthetic' but"):
        gs.load_config({"task": "sft", "data": {"source": "synthetic"}})
    with pytest.raises(ConfigError, match="set task: sft"):
        gs.load_config({"data": {"source": "synthetic", "synthetic": {"name": "addition"}}})
