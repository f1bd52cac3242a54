"""What every generator shares: the tokenizer checks, the loop that draws exactly ``n`` examples, and finding spans.

A template assumption that a tokenizer breaks (too few single-token names, pairs that never tokenize to the same
length, an answer that is several tokens) is a one-line ``CircuitsError`` naming the task, the tokenizer and the
assumption, raised by ``tasks.get`` before any model runs.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from circuits.errors import CircuitsError
from circuits.task import Task

Answer = str | list[str]


@dataclass(frozen=True)
class Example:
    """One clean/corrupted pair; the answers are those of the clean prompt. ``spans``: the character ranges
    ``[start, end)`` of the clean prompt that play each named role (``circuits.spans``)."""

    clean: str
    corrupted: str
    answer: Answer
    wrong: Answer
    spans: dict[str, list[int]] | None = None


# The last word, contraction ("'t") or run of punctuation: tokenizers end a prompt with it, whole
LAST_TOKEN = re.compile(r"(?:'\w+|\w+|[^\w\s]+)$")


def fill(template: str, **values: str) -> tuple[str, dict[str, list[int]]]:
    """``template.format(**values)`` and the character range ``[start, end)`` each field landed at (its first
    occurrence): found while formatting, so a name the prompt holds twice is never taken for the other."""
    text, ranges = "", {}
    for literal, field, _, _ in string.Formatter().parse(template):
        text += literal
        if field is not None:
            ranges.setdefault(field, [len(text), len(text) + len(values[field])])
            text += values[field]
    return text, ranges


def last_token(prompt: str) -> list[int]:
    """The character range of the prompt's last token (its last word, contraction or punctuation): the ``END``
    span, where the logits are read."""
    return list(LAST_TOKEN.search(prompt).span())


def describe(tokenizer) -> str:
    """The tokenizer in a few words for an error message: its class and, if known, where it was loaded from."""
    if tokenizer is None:
        return "no tokenizer"
    source = getattr(tokenizer, "name_or_path", None)
    return f"{type(tokenizer).__name__}({str(source)!r})" if source else type(tokenizer).__name__


def under(name: str, tokenizer) -> str:
    """``task 'ioi' under GemmaTokenizer('...')``: how every error of a generator begins."""
    return f"task {name!r} under {describe(tokenizer)}"


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
        """The tokens of ``text`` as a prompt, with the special tokens the tokenizer adds (Gemma's ``<bos>``)."""
        return self._prompt_length(text)

    def pieces(self, text: str) -> int:
        """The tokens of ``text`` alone, without special tokens."""
        return self._piece_length(text)

    def split(self, text: str) -> list[str]:
        """``text`` as the tokenizer splits it (for error messages)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.tokenizer.decode([i]) for i in ids]

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


def enough(name: str, what: str, pool: Sequence, needed: int, tokens: Tokens | None = None) -> None:
    """Raise if filtering to single tokens left fewer than ``needed`` items in ``pool``."""
    if len(pool) < needed:
        where = under(name, tokens.tokenizer) if tokens is not None else f"task {name!r}"
        raise CircuitsError(
            f"{where}: only {len(pool)} {what} are single tokens under this tokenizer, {needed} are needed"
        )


def build(
    name: str,
    n: int,
    seed: int,
    tokens: Tokens,
    draw: Callable[[random.Random], Example | str | None],
    metric: str = "logit_diff",
) -> Task:
    """A task of exactly ``n`` examples from ``draw``, skipping draws whose pair lengths or answers do not fit; it
    declares the examples' spans if they have them.

    ``draw`` returns ``None``, or a string saying why, to skip a draw of its own. Raises ``CircuitsError`` if too
    few draws fit, naming the task, the tokenizer and why the draws were skipped (with an example of each reason).
    """
    if n < 1:
        raise CircuitsError(f"a task needs n >= 1 examples, got {n}")
    rng = random.Random(seed)
    examples: list[Example] = []
    skipped: dict[str, list] = {}  # why -> [count, first instance]
    attempts = max(1000, 50 * n)
    for _ in range(attempts):
        if len(examples) == n:
            break
        example = draw(rng)
        why = _misfit(example, tokens)
        if why is None:
            examples.append(example)
        else:
            skipped.setdefault(why[0], [0, why[1]])[0] += 1
    if len(examples) < n:
        reasons = "; ".join(
            f"{count} draws: {why}" + (f", e.g. {instance}" if instance else "")
            for why, (count, instance) in skipped.items()
        )
        raise CircuitsError(
            f"{under(name, tokens.tokenizer)}: only {len(examples)} of the {n} examples asked for could be built in "
            f"{attempts} draws (pairs of equal token length with single-token answers are needed): {reasons}"
        )
    return Task(
        name,
        [e.clean for e in examples],
        [e.corrupted for e in examples],
        [e.answer for e in examples],
        [e.wrong for e in examples],
        metric=metric,
        spans=None if examples[0].spans is None else [e.spans for e in examples],
    )


def _misfit(example: Example | str | None, tokens: Tokens) -> tuple[str, str | None] | None:
    """Why a draw does not fit the tokenizer (the reason and this draw's instance of it), or None if it fits."""
    if example is None:
        return "skipped by the generator", None
    if isinstance(example, str):
        return example, None
    if not tokens.same_length(example.clean, example.corrupted):
        return "the clean and corrupted prompts tokenize to different lengths", (
            f"{example.clean!r} ({tokens.length(example.clean)} tokens) vs "
            f"{example.corrupted!r} ({tokens.length(example.corrupted)})"
        )
    for answer in (example.answer, example.wrong):
        for text in answer if isinstance(answer, list) else [answer]:
            if not tokens.single(text):
                return "an answer is not one token", f"{text!r} -> {tokens.split(text)}"
    return None
