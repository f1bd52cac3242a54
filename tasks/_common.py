"""What every generator shares: the tokenizer checks and the loop that draws exactly ``n`` examples."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from circuits.errors import CircuitsError
from circuits.task import Task

Answer = str | list[str]


@dataclass(frozen=True)
class Example:
    """One clean/corrupted pair; the answers are those of the clean prompt."""

    clean: str
    corrupted: str
    answer: Answer
    wrong: Answer


class Tokens:
    """Token counts under one tokenizer (or none: then every word counts as one token and every pair matches)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._prompt_length = lru_cache(maxsize=None)(self._count_prompt)
        self._piece_length = lru_cache(maxsize=None)(self._count_piece)

    def _count_prompt(self, text: str) -> int:
        # The same call Task.tokenize makes, so that special tokens count alike.
        return len(self.tokenizer(text)["input_ids"])

    def _count_piece(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def length(self, text: str) -> int:
        """The tokens of ``text`` as a prompt."""
        return self._prompt_length(text)

    def single(self, text: str) -> bool:
        """Is ``text`` (an answer, a name with its leading space) exactly one token? Always true without a tokenizer."""
        return self.tokenizer is None or self._piece_length(text) == 1

    def singles(self, words: Sequence[str], prefix: str = " ") -> list[str]:
        """The words that are one token with ``prefix`` in front, in their given order."""
        return [word for word in words if self.single(prefix + word)]

    def same_length(self, first: str, second: str) -> bool:
        return self.tokenizer is None or self.length(first) == self.length(second)

    def answers_single(self, answer: Answer) -> bool:
        return all(self.single(a) for a in (answer if isinstance(answer, list) else [answer]))


def enough(name: str, what: str, pool: Sequence, needed: int) -> None:
    """Raise if filtering to single tokens left fewer than ``needed`` items in ``pool``."""
    if len(pool) < needed:
        raise CircuitsError(
            f"task {name!r}: only {len(pool)} {what} are single tokens under this tokenizer, {needed} are needed"
        )


def build(
    name: str,
    n: int,
    seed: int,
    tokens: Tokens,
    draw: Callable[[random.Random], Example | None],
    metric: str = "logit_diff",
) -> Task:
    """A task of exactly ``n`` examples from ``draw``, skipping draws whose pair lengths or answers do not fit.

    ``draw`` returns ``None`` to skip a draw of its own. Raises ``CircuitsError`` if too few draws fit.
    """
    if n < 1:
        raise CircuitsError(f"a task needs n >= 1 examples, got {n}")
    rng = random.Random(seed)
    examples: list[Example] = []
    attempts = max(1000, 50 * n)
    for _ in range(attempts):
        if len(examples) == n:
            break
        example = draw(rng)
        if example is None or not tokens.same_length(example.clean, example.corrupted):
            continue
        if tokens.answers_single(example.answer) and tokens.answers_single(example.wrong):
            examples.append(example)
    if len(examples) < n:
        raise CircuitsError(
            f"task {name!r}: only {len(examples)} of the {n} examples asked for could be built in {attempts} draws "
            "(pairs of equal token length with single-token answers)"
        )
    return Task(
        name,
        [e.clean for e in examples],
        [e.corrupted for e in examples],
        [e.answer for e in examples],
        [e.wrong for e in examples],
        metric=metric,
    )
