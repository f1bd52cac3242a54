"""Token positions grouped into named spans: what a position-resolved edge is resolved by.

A task may name, per example, the positions that play each role ("IO", "S1", "S2", "END", ...): a
text task names character ranges ``[start, end)`` of its clean prompt, a token-id task names token
positions (an int or a list of ints, negative ones counting from the prompt's end); a span an
example lacks is None (text) or an empty list. Positions no span names fall into one ``rest`` span.
Without declared spans, prompts of one length (one template) resolve every position on its own: span
``"3"`` is position 3.

A layout (``Spans``) also records what pruning by position needs: which spans attention can carry
information from and to (a position of span a at or before a position of span b in some example), and
which spans the logits are read at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import CircuitsError

if TYPE_CHECKING:
    from .task import TokenizedTask

REST = "rest"  # the span of every position no declared span names


@dataclass(frozen=True)
class Spans:
    """The spans positions are grouped into, and how information can move between them."""

    names: tuple[str, ...]
    reaches: torch.Tensor  # [S, S] bool: attention can carry information from span a (row) to span b
    readout: torch.Tensor  # [S] bool: the logits are read at a position of this span in some example

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise CircuitsError(f"unknown span {name!r}; the spans are {', '.join(self.names)}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "reaches": self.reaches.int().tolist(), "readout": self.readout.tolist()}

    @classmethod
    def from_dict(cls, data: Any) -> Spans:
        try:
            names = tuple(str(name) for name in data["names"])
            reaches = torch.tensor(data["reaches"], dtype=torch.bool).view(len(names), len(names))
            readout = torch.tensor(data["readout"], dtype=torch.bool).view(len(names))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CircuitsError(f"spans must hold names, reaches [S, S] and readout [S]: {error}") from None
        return cls(names, reaches, readout)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Spans)
            and self.names == other.names
            and torch.equal(self.reaches, other.reaches)
            and torch.equal(self.readout, other.readout)
        )

    __hash__ = None  # a mutable tensor inside: not hashable


def check_declared(spans: Any, n_examples: int, text: bool, prompts: Sequence) -> list[dict[str, list[int]]] | None:
    """The spans a task declares, validated and as plain lists: per example ``{name: [start, end]}`` (text) or
    ``{name: [positions]}`` (token ids). Every example names the same spans; errors name the example and span."""
    if spans is None:
        return None
    if isinstance(spans, (str, bytes, dict)) or not isinstance(spans, Sequence) or len(spans) != n_examples:
        raise CircuitsError(f"spans must be a list of {n_examples} dicts (one per example), got {type(spans).__name__}")
    checked, names = [], None
    for i, example in enumerate(spans):
        if not isinstance(example, dict) or not example:
            raise CircuitsError(f"example {i}: spans must be a non-empty dict of span name -> positions")
        if names is None:
            names = list(example)
        elif set(example) != set(names):
            raise CircuitsError(
                f"example {i}: names spans {sorted(example)} but example 0 names {sorted(names)}; every example "
                "names the same spans"
            )
        row = {}
        for name in names:
            if not isinstance(name, str) or not name or name == REST:
                raise CircuitsError(f"example {i}: span name {name!r} must be a non-empty string other than {REST!r}")
            row[name] = _check_value(example[name], text, len(prompts[i]), f"example {i}, span {name!r}")
        checked.append(row)
    return checked


def _check_value(value: Any, text: bool, length: int, what: str) -> list[int]:
    if value is None or (not text and isinstance(value, Sequence) and len(value) == 0):
        return []  # the span is absent from this example
    if text:
        ok = (
            isinstance(value, Sequence)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1] <= length
        )
        if not ok:
            raise CircuitsError(
                f"{what}: a text task names a character range [start, end) of its clean prompt (0 <= start < end "
                f"<= {length}), got {value!r}"
            )
        return [int(value[0]), int(value[1])]
    values = [value] if isinstance(value, int) else value
    ok = isinstance(values, Sequence) and all(
        isinstance(v, int) and not isinstance(v, bool) and -length <= v < length for v in values
    )
    if not ok:
        raise CircuitsError(
            f"{what}: a token-id task names a token position or a list of them (in {-length}..{length - 1}; empty "
            f"where the span is absent), got {value!r}"
        )
    return [int(v) % length for v in values]


def token_positions(tokenizer, prompt: str, ranges: dict[str, list[int]], ids: list[int], what: str) -> dict:
    """Character ranges of a text prompt as token positions: the tokens of ``prompt[:end]`` past those of the
    text before ``start`` (its trailing spaces left to the span: tokenizers attach a word's space to it)."""
    positions = {}
    for name, span in ranges.items():
        if not span:  # absent from this example
            positions[name] = []
            continue
        start, end = span
        first = len(tokenizer(prompt[:start].rstrip(" "))["input_ids"]) if prompt[:start].strip() else None
        upto = tokenizer(prompt[:end])["input_ids"]
        if first is None:  # nothing before the span but spaces: it starts after any special tokens
            first = len(upto) - len(tokenizer(prompt[:end], add_special_tokens=False)["input_ids"])
        if upto != ids[: len(upto)] or first >= len(upto):
            raise CircuitsError(
                f"{what}, span {name!r}: characters {start}..{end} ({prompt[start:end]!r}) do not cover whole tokens "
                "of the prompt; start a range at a word (or its leading space) and end it at a word's end"
            )
        positions[name] = list(range(first, len(upto)))
    return positions


def span_ids(names: Sequence[str], positions: Sequence[dict[str, list[int]]], width: int) -> torch.Tensor:
    """``[N, T]`` span index of every position (``rest``, index ``len(names)``, where no span names it); a
    position named by two spans is an error."""
    ids = torch.full((len(positions), width), len(names), dtype=torch.long)
    for i, example in enumerate(positions):
        owner: dict[int, str] = {}
        for s, name in enumerate(names):
            for position in example[name]:
                if position in owner:
                    raise CircuitsError(
                        f"example {i}: token position {position} is in both span {owner[position]!r} and {name!r}"
                    )
                owner[position] = name
                ids[i, position] = s
    return ids


def per_token_ids(tokenized: TokenizedTask) -> torch.Tensor:
    """Every position its own span: prompts must then have one length (one template)."""
    lengths = tokenized.attention_mask.sum(1)
    different = (lengths != lengths[0]).nonzero().flatten().tolist()
    if different:
        i = different[0]
        raise CircuitsError(
            f"example {tokenized.start + i} is {int(lengths[i])} tokens long but example {tokenized.start} is "
            f"{int(lengths[0])}: resolving every position on its own needs prompts of one length; declare named "
            "spans instead (Task(..., spans=[{'S1': ..., 'END': ...}, ...]))"
        )
    return torch.arange(tokenized.clean_ids.shape[1]).expand_as(tokenized.clean_ids).clone()


def layout(tokenized: TokenizedTask, per_token: bool = False) -> tuple[Spans, torch.Tensor]:
    """The task's spans and the ``[N, T]`` span index of every position: its declared spans and ``rest``, or
    with ``per_token`` (or when it declares none) every position on its own."""
    if tokenized.span_ids is None or per_token:
        ids = per_token_ids(tokenized)
        names = tuple(str(t) for t in range(ids.shape[1]))
    else:
        ids, names = tokenized.span_ids, (*tokenized.span_names, REST)
    real = tokenized.attention_mask.bool().cpu()
    ids = ids.cpu()
    count = len(names)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    big = ids.shape[1] + 1
    first = torch.full((len(ids), count), big).scatter_reduce(
        1, ids, torch.where(real, positions, big), "amin", include_self=True
    )
    last = torch.full((len(ids), count), -1).scatter_reduce(
        1, ids, torch.where(real, positions, -1), "amax", include_self=True
    )
    present = last >= 0
    # a before b in some example: a position of a at or before a position of b (attention runs forward)
    reaches = ((first[:, :, None] <= last[:, None, :]) & present[:, :, None] & present[:, None, :]).any(0)
    if tokenized.output_mask is not None:
        read = tokenized.output_mask.bool().cpu() & real
    else:
        read = torch.zeros_like(real)
        read[torch.arange(len(ids)), tokenized.positions.cpu()] = True
    readout = torch.zeros(count, dtype=torch.bool)
    readout[ids[read].unique()] = True
    return Spans(names, reaches, readout), ids
