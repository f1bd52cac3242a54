"""Tasks: clean prompts, corrupted prompts, answers, and the metric that scores the model on them.

A task holds either text (tokenized with the model's tokenizer) or token ids
(for models without a tokenizer). Tokenizing checks what patching needs: the
two prompts of a pair have the same length, and every answer is one token.
Errors name the example and show its text and tokens.

Most tasks score one prediction position per example (the last token). A task
built with ``Task.from_outputs`` scores several positions per example against
known outputs (a compiled program's, say); its metric is averaged over them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .choices import METRICS
from .errors import CircuitsError
from .io import atomic_write_text
from .spans import check_declared, span_ids, token_positions

if TYPE_CHECKING:
    import pandas as pd

    from .model import Model

REFERENCE_METRICS = ("kl", "l2")  # compare with the clean run's logits: no answers needed
# Does the clean model score high on the metric? (kl and l2 are 0 on the clean run and grow with ablation.)
HIGHER_IS_BETTER: dict[str, bool] = {"logit_diff": True, "prob_diff": True, "kl": False, "l2": False}
Metric = str | Callable[[torch.Tensor, "TokenizedTask"], torch.Tensor]
TEXT_KEYS = ("clean", "corrupted", "answers", "wrong_answers")
ID_KEYS = ("clean_ids", "corrupted_ids", "answer_ids", "wrong_answer_ids")
OUTPUT_KEYS = ("clean_ids", "corrupted_ids", "outputs", "positions")
MAX_ID = 2**63 - 1  # ids become int64 tensors


@dataclass
class TokenizedTask:
    """A task as tensors: right-padded prompts and padded answer sets (``*_mask`` marks the real entries)."""

    clean_ids: torch.Tensor  # [N, T]
    corrupted_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    positions: torch.Tensor | None  # [N] the prediction position (each prompt's last token); None: output_mask
    answer_ids: torch.Tensor  # [N, A]
    answer_mask: torch.Tensor  # [N, A] bool
    wrong_ids: torch.Tensor  # [N, W]
    wrong_mask: torch.Tensor  # [N, W] bool
    start: int = 0  # index of the first example in the whole task
    # Tasks scored at several positions (Task.from_outputs); the model then returns logits at every position.
    output_mask: torch.Tensor | None = None  # [N, T] bool: the scored positions
    targets: torch.Tensor | None = None  # [N, T] float: the expected output id, or value (numeric), per position
    numeric: bool = False  # targets are values of output unit 0, not output ids
    tolerance: float = 0.0  # a numeric output is correct within this distance of its target
    # Declared spans (circuits.spans): the span index of every position (len(span_names) = rest), or None.
    span_ids: torch.Tensor | None = None  # [N, T]
    span_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.clean_ids)

    def batches(self, batch_size: int):
        """Consecutive batches, each trimmed to its own longest prompt."""
        if batch_size < 1:
            raise CircuitsError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def __getitem__(self, rows: slice) -> TokenizedTask:
        """The examples ``rows``, their padding cut to the longest of them."""
        return self.rows(rows, int(self.attention_mask[rows].sum(1).max()))

    def rows(self, rows: slice, length: int | None = None) -> TokenizedTask:
        """The examples ``rows`` with ``length`` positions (default: all, the width of the other examples)."""
        length = self.clean_ids.shape[1] if length is None else length
        per_position = self.output_mask is not None
        return TokenizedTask(
            self.clean_ids[rows, :length],
            self.corrupted_ids[rows, :length],
            self.attention_mask[rows, :length],
            None if self.positions is None else self.positions[rows],
            self.answer_ids[rows],
            self.answer_mask[rows],
            self.wrong_ids[rows],
            self.wrong_mask[rows],
            self.start + (rows.start or 0),
            self.output_mask[rows, :length] if per_position else None,
            self.targets[rows, :length] if per_position else None,
            self.numeric,
            self.tolerance,
            None if self.span_ids is None else self.span_ids[rows, :length],
            self.span_names,
        )

    def to(self, device: torch.device | str) -> TokenizedTask:
        fields = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return replace(self, **fields)


def metric_values(
    metric: Metric, logits: torch.Tensor, batch: TokenizedTask, clean_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """The metric per example, from logits ``[B, V]`` at the prediction positions.

    ``kl`` is KL(clean model || this run) and ``l2`` the mean squared difference of the logits from the
    clean run's (the ACDC paper's metric for its tracr tasks); both need the clean run's logits. For a
    task scored at several positions (``batch.output_mask``) the logits are ``[B, T, V]`` and the
    metric is averaged over the scored positions (a callable metric gets the ``[B, T, V]`` logits).
    """
    if callable(metric):
        return _custom_metric(metric, logits, batch)
    if metric in REFERENCE_METRICS:
        if clean_logits is None:
            raise CircuitsError(f"the {metric} metric needs the clean run's logits")
        if metric == "kl":
            clean = F.log_softmax(clean_logits.float(), -1)
            values = (clean.exp() * (clean - F.log_softmax(logits.float(), -1))).sum(-1)
        else:
            values = (logits.float() - clean_logits.float()).pow(2).mean(-1)
        if batch.output_mask is None:
            return values
        weights = batch.output_mask.to(values.dtype)
        return (values * weights).sum(1) / weights.sum(1)
    if batch.output_mask is not None:
        raise CircuitsError(
            f"metric {metric!r} needs answer tokens; a task scored against outputs takes kl, l2 or a callable"
        )
    values = logits.float() if metric == "logit_diff" else F.softmax(logits.float(), -1)
    answer = (values.gather(1, batch.answer_ids) * batch.answer_mask).sum(1)
    wrong = (values.gather(1, batch.wrong_ids) * batch.wrong_mask).sum(1)
    if metric == "logit_diff":  # mean over each set
        return answer / batch.answer_mask.sum(1) - wrong / batch.wrong_mask.sum(1)
    return answer - wrong  # prob_diff: summed probability of each set


def correct(logits: torch.Tensor, batch: TokenizedTask) -> torch.Tensor:
    """Per example: does the best answer's logit beat the best wrong answer's?

    For a task scored against outputs: is every scored position's top output id its target (or, for
    numeric outputs, output unit 0 within the task's tolerance of its target)?
    """
    if batch.output_mask is not None:
        if batch.numeric:
            right = (logits[..., 0].float() - batch.targets).abs() <= batch.tolerance
        else:
            right = logits.argmax(-1) == batch.targets.long()
        return (right | ~batch.output_mask).all(1)
    lowest = torch.finfo(logits.dtype).min
    best_answer = logits.gather(1, batch.answer_ids).masked_fill(~batch.answer_mask, lowest).max(1).values
    best_wrong = logits.gather(1, batch.wrong_ids).masked_fill(~batch.wrong_mask, lowest).max(1).values
    return best_answer > best_wrong


def _custom_metric(metric: Callable, logits: torch.Tensor, batch: TokenizedTask) -> torch.Tensor:
    name = getattr(metric, "__name__", "custom metric")
    values = metric(logits, batch)
    if not isinstance(values, torch.Tensor):
        raise CircuitsError(f"metric {name!r} returned {type(values).__name__}; it must return a tensor")
    if tuple(values.shape) != (len(batch),):
        raise CircuitsError(
            f"metric {name!r} returned shape {tuple(values.shape)}; "
            f"it must return one value per example: ({len(batch)},)"
        )
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if len(bad):
        raise CircuitsError(f"metric {name!r} returned {values[bad[0]].item()} for example {batch.start + int(bad[0])}")
    if torch.is_grad_enabled() and logits.requires_grad and not values.requires_grad:
        raise CircuitsError(
            f"metric {name!r} returned a tensor detached from the logits (no grad_fn), so gradient methods cannot "
            "differentiate it: compute it from the logits with torch operations, without .detach(), .item(), "
            ".tolist(), .numpy() or torch.tensor(...)"
        )
    return values


@dataclass
class Baseline:
    """How the unmodified model does on a task."""

    clean: float  # mean metric on the clean prompts
    corrupted: float  # mean metric on the corrupted prompts (scored with the clean answers)
    accuracy: float  # fraction of clean prompts where an answer beats every wrong answer
    per_example: pd.DataFrame  # columns clean, corrupted, correct


class Task:
    """Clean and corrupted prompts with their answers and a metric.

    ``answers[i]`` and ``wrong_answers[i]`` are one string or a list of strings (a set:
    ``logit_diff`` then compares mean logits, ``prob_diff`` summed probabilities).
    ``metric`` is one of ``circuits.choices.METRICS`` or a callable ``(logits [B, V], TokenizedTask
    batch) -> [B]``; a callable declares ``higher_is_better`` (True when the clean model scores high
    and ablating what carries the task lowers it), which selecting the edges that carry the task needs.
    ``spans``: per example, the character ranges ``[start, end)`` of the clean prompt that play each named
    role (``{"IO": [5, 10], "S2": [33, 38], "END": [50, 53]}``), which position-resolved attribution groups
    positions by (``circuits.spans``); every example names the same spans.
    """

    numeric = False  # tasks from from_outputs: are the outputs values rather than output ids?
    spans: list[dict[str, list[int]]] | None = None  # declared spans per example (circuits.spans), checked
    tolerance = 0.0
    _declared_higher_is_better: bool | None = None
    # A task read from a file: (the file, each example's line number), so that errors name the line.
    _origin: tuple[Path, list[int]] | None = None

    @property
    def higher_is_better(self) -> bool | None:
        """Does the clean model score high on the metric? Known for every named metric; a callable metric's
        is what the task declared (None if it did not)."""
        if isinstance(self.metric, str):
            return HIGHER_IS_BETTER[self.metric]
        return self._declared_higher_is_better

    def _set_metric(self, metric: Metric, higher_is_better: bool | None) -> None:
        self.metric = _check_metric(metric)
        if higher_is_better is not None and not isinstance(higher_is_better, bool):
            raise CircuitsError(f"higher_is_better must be True, False or None, got {higher_is_better!r}")
        if isinstance(metric, str) and higher_is_better not in (None, HIGHER_IS_BETTER[metric]):
            raise CircuitsError(
                f"metric {metric!r} has higher_is_better={HIGHER_IS_BETTER[metric]}; "
                f"higher_is_better={higher_is_better} contradicts it"
            )
        self._declared_higher_is_better = higher_is_better

    def __init__(
        self,
        name: str,
        clean: Sequence[str],
        corrupted: Sequence[str],
        answers: Sequence[str | Sequence[str]],
        wrong_answers: Sequence[str | Sequence[str]],
        metric: Metric = "logit_diff",
        higher_is_better: bool | None = None,
        spans: Sequence[dict[str, Sequence[int]]] | None = None,
    ):
        self.name = _check_name(name)
        self._set_metric(metric, higher_is_better)
        _check_lengths(self.name, clean=clean, corrupted=corrupted, answers=answers, wrong_answers=wrong_answers)
        for i in range(len(clean)):
            for field, prompt in (("clean", clean[i]), ("corrupted", corrupted[i])):
                if not isinstance(prompt, str) or not prompt:
                    raise CircuitsError(f"example {i}: the {field} prompt must be a non-empty string, got {prompt!r}")
            for field, answer in (("answer", answers[i]), ("wrong answer", wrong_answers[i])):
                _answer_set(answer, str, f"example {i}: {field}")
        self.clean, self.corrupted = list(clean), list(corrupted)
        self.answers, self.wrong_answers = list(answers), list(wrong_answers)
        self.spans = check_declared(spans, len(clean), True, self.clean)
        self.token_ids: dict[str, list] | None = None
        self._tokenized: dict[int, tuple[Any, TokenizedTask]] = {}

    @classmethod
    def from_token_ids(
        cls,
        name: str,
        clean_ids: Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
        corrupted_ids: Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
        answer_ids: Sequence[int | Sequence[int]] | torch.Tensor | np.ndarray,
        wrong_answer_ids: Sequence[int | Sequence[int]] | torch.Tensor | np.ndarray,
        metric: Metric = "logit_diff",
        higher_is_better: bool | None = None,
        spans: Sequence[dict[str, int | Sequence[int]]] | None = None,
    ) -> Task:
        """A task given as token ids, for models without a tokenizer.

        Each column is a list (of lists), a list of 1-D tensors or numpy arrays, or one tensor or array:
        prompts ``[N, T]`` (every prompt T tokens), answers ``[N]`` (one each) or ``[N, k]`` (k each).
        ``spans``: per example, ``{name: token position or list of them}`` (see ``circuits.spans``).
        """
        task = cls.__new__(cls)
        task.name = _check_name(name)
        task._set_metric(metric, higher_is_better)
        clean_ids = _as_lists(task.name, "clean_ids", clean_ids, (2,))
        corrupted_ids = _as_lists(task.name, "corrupted_ids", corrupted_ids, (2,))
        answer_ids = _as_lists(task.name, "answer_ids", answer_ids, (1, 2))
        wrong_answer_ids = _as_lists(task.name, "wrong_answer_ids", wrong_answer_ids, (1, 2))
        columns = dict(clean_ids=clean_ids, corrupted_ids=corrupted_ids)
        _check_lengths(task.name, **columns, answer_ids=answer_ids, wrong_answer_ids=wrong_answer_ids)
        for i in range(len(clean_ids)):
            _check_id_pair(i, columns)
            _answer_set(answer_ids[i], int, f"example {i}: answer id")
            _answer_set(wrong_answer_ids[i], int, f"example {i}: wrong answer id")
        task.clean = task.corrupted = task.answers = task.wrong_answers = None
        task.token_ids = {
            "clean_ids": [[int(t) for t in ids] for ids in clean_ids],
            "corrupted_ids": [[int(t) for t in ids] for ids in corrupted_ids],
            "answer_ids": _plain(answer_ids),
            "wrong_answer_ids": _plain(wrong_answer_ids),
        }
        task.spans = check_declared(spans, len(clean_ids), False, task.token_ids["clean_ids"])
        task._tokenized = {}
        return task

    @classmethod
    def from_outputs(
        cls,
        name: str,
        clean_ids: Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
        corrupted_ids: Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
        outputs: Sequence[Sequence[int | float]] | torch.Tensor | np.ndarray,
        positions: str | Sequence[Sequence[int]] | torch.Tensor | np.ndarray = "all",
        metric: Metric = "l2",
        numeric: bool = False,
        tolerance: float = 1e-3,
        higher_is_better: bool | None = None,
    ) -> Task:
        """A task scored at several positions per example against known outputs (e.g. a compiled program's).

        ``positions``: ``"all"`` (every position of each prompt) or one list of positions per example;
        ``outputs[i][k]`` is the expected output at example i's k-th scored position: an output id (the
        model's top logit there should be it) or, with ``numeric=True``, the value of output unit 0
        (correct within ``tolerance``). ``metric``: ``"l2"``, ``"kl"`` or a callable ``(logits [B, T, V],
        batch) -> [B]`` (``batch.output_mask`` marks the scored positions); it is averaged over the
        scored positions. The outputs decide accuracy (``correct``); the metric compares with the clean run.
        Ids, outputs and positions may also be tensors or numpy arrays (``[N, T]``), or lists of 1-D ones.
        """
        task = cls.__new__(cls)
        task.name = _check_name(name)
        task._set_metric(metric, higher_is_better)
        if isinstance(metric, str) and metric not in REFERENCE_METRICS:
            raise CircuitsError(
                f"metric {metric!r} needs answer tokens; a task scored against outputs takes kl, l2 or a callable"
            )
        if not isinstance(numeric, bool):
            raise CircuitsError(f"numeric must be True or False, got {numeric!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise CircuitsError(f"tolerance must be a number >= 0, got {tolerance!r}")
        clean_ids = _as_lists(task.name, "clean_ids", clean_ids, (2,))
        corrupted_ids = _as_lists(task.name, "corrupted_ids", corrupted_ids, (2,))
        outputs = _as_lists(task.name, "outputs", outputs, (2,), numbers=numeric)
        if not isinstance(positions, str):
            positions = _as_lists(task.name, "positions", positions, (2,))
        columns = dict(clean_ids=clean_ids, corrupted_ids=corrupted_ids)
        _check_lengths(task.name, **columns, outputs=outputs)
        if positions == "all":
            positions = [list(range(len(ids))) if _is_id_list(ids) else [] for ids in clean_ids]
        _check_lengths(task.name, clean_ids=clean_ids, positions=positions)
        for i in range(len(clean_ids)):
            _check_id_pair(i, columns)
            _check_positions(positions[i], len(clean_ids[i]), f"example {i}")
            _check_outputs(outputs[i], len(positions[i]), numeric, f"example {i}")
        task.clean = task.corrupted = task.answers = task.wrong_answers = None
        task.token_ids = {
            "clean_ids": [[int(t) for t in ids] for ids in clean_ids],
            "corrupted_ids": [[int(t) for t in ids] for ids in corrupted_ids],
            "outputs": [[float(o) if numeric else int(o) for o in row] for row in outputs],
            "positions": [[int(p) for p in row] for row in positions],
        }
        task.numeric, task.tolerance = numeric, float(tolerance)
        task._tokenized = {}
        return task

    @property
    def per_position(self) -> bool:
        """Is the task scored at several positions per example (built with ``from_outputs``)?"""
        return bool(self.token_ids) and "outputs" in self.token_ids

    def to_dict(self) -> dict[str, Any]:
        """The task as plain JSON-ready data (``Task.from_dict`` reads it back); the metric must be a name."""
        if not isinstance(self.metric, str):
            raise CircuitsError(f"task {self.name!r} has a callable metric, which cannot be written as data")
        if self.per_position:
            extra = {"numeric": self.numeric, "tolerance": self.tolerance}
            return {"name": self.name, "metric": self.metric, **self.token_ids, **extra}
        columns = self.token_ids if self.token_ids else {key: getattr(self, key) for key in TEXT_KEYS}
        spans = {} if self.spans is None else {"spans": self.spans}
        return {"name": self.name, "metric": self.metric, **columns, **spans}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """A task from ``Task.to_dict`` data: text, token ids, or outputs scored at several positions."""
        if not isinstance(data, dict):
            raise CircuitsError(f"task data must be a JSON object, got {type(data).__name__}")
        keys = OUTPUT_KEYS if "outputs" in data else ID_KEYS if "clean_ids" in data else TEXT_KEYS
        missing = [key for key in ("name", *keys) if key not in data]
        if missing:
            raise CircuitsError(f"task data lacks {', '.join(map(repr, missing))}")
        columns = [data[key] for key in keys]
        metric = data.get("metric", "l2" if keys is OUTPUT_KEYS else "logit_diff")
        if keys is OUTPUT_KEYS:
            options = {k: data[k] for k in ("numeric", "tolerance") if k in data}
            return cls.from_outputs(data["name"], *columns, metric=metric, **options)
        if keys is ID_KEYS:
            return cls.from_token_ids(data["name"], *columns, metric=metric, spans=data.get("spans"))
        return cls(data["name"], *columns, metric=metric, spans=data.get("spans"))

    def __len__(self) -> int:
        return len(self.token_ids["clean_ids"]) if self.token_ids else len(self.clean)

    def __repr__(self) -> str:
        kind = "outputs at several positions" if self.per_position else "token ids" if self.token_ids else "text"
        metric = self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "custom")
        return f"Task({self.name!r}: {len(self)} examples, {kind}, metric {metric})"

    # --- tokenization -------------------------------------------------------------------
    def tokenize(self, tokenizer=None) -> TokenizedTask:
        """The task as tensors (cached per tokenizer). Token-id tasks need no tokenizer."""
        key = 0 if self.token_ids else id(tokenizer)
        if key not in self._tokenized:
            if self.per_position:
                tokenized = _pack_outputs(**self.token_ids, numeric=self.numeric, tolerance=self.tolerance)
            elif self.token_ids:
                ids = self.token_ids
                tokenized = _pack(ids["clean_ids"], ids["corrupted_ids"], ids["answer_ids"], ids["wrong_answer_ids"])
                tokenized = _with_spans(tokenized, self.spans)
            else:
                try:
                    tokenized = self._tokenize_text(tokenizer)
                except CircuitsError as error:
                    raise self._located(error) from None
            self._tokenized[key] = (tokenizer, tokenized)  # the tokenizer is kept so its id stays unique
        return self._tokenized[key][1]

    def check(self, model: Model) -> TokenizedTask:
        """The task tokenized for ``model`` and checked against it before anything runs: every prompt fits the
        model's positions, every prompt, answer and output id is in its vocabulary (``engine.check_task``).
        Errors name the example (for a task read from a file: its file and line)."""
        from .engine import check_task

        tokenized = self.tokenize(model.tokenizer)
        try:
            check_task(model, tokenized)
        except CircuitsError as error:
            raise self._located(error) from None
        return tokenized

    def _located(self, error: CircuitsError) -> CircuitsError:
        """``error`` with its leading ``example i`` replaced by the example's file and line, for a file's task."""
        if self._origin is None:
            return error
        return CircuitsError(_at_line(str(error), *self._origin))

    def _tokenize_text(self, tokenizer) -> TokenizedTask:
        if tokenizer is None:
            raise CircuitsError(f"task {self.name!r} holds text: tokenize it with the model's tokenizer")
        clean_ids, corrupted_ids, answer_ids, wrong_ids = [], [], [], []
        for i in range(len(self)):
            clean = tokenizer(self.clean[i])["input_ids"]
            corrupted = tokenizer(self.corrupted[i])["input_ids"]
            if len(clean) != len(corrupted):
                raise CircuitsError(
                    f"example {i}: the clean and corrupted prompts tokenize to different lengths "
                    f"({len(clean)} vs {len(corrupted)} tokens): "
                    f"clean {self.clean[i]!r} -> {tokenizer.convert_ids_to_tokens(clean)}, "
                    f"corrupted {self.corrupted[i]!r} -> {tokenizer.convert_ids_to_tokens(corrupted)}"
                )
            clean_ids.append(clean)
            corrupted_ids.append(corrupted)
            answer_ids.append(_single_tokens(tokenizer, self.answers[i], f"example {i}: answer"))
            wrong_ids.append(_single_tokens(tokenizer, self.wrong_answers[i], f"example {i}: wrong answer"))
        positions = None
        if self.spans is not None:
            positions = [
                token_positions(tokenizer, self.clean[i], self.spans[i], clean_ids[i], f"example {i}")
                for i in range(len(self))
            ]
        return _with_spans(_pack(clean_ids, corrupted_ids, answer_ids, wrong_ids), positions)

    # --- subsets and files ------------------------------------------------------------
    def _select(self, indices: Sequence[int], name: str | None = None) -> Task:
        task = self._select_examples(indices, name or self.name)
        if self._origin is not None:
            path, lines = self._origin
            task._origin = (path, [lines[i] for i in indices])
        return task

    def _select_examples(self, indices: Sequence[int], name: str) -> Task:
        if self.per_position:
            columns = [[self.token_ids[key][i] for i in indices] for key in OUTPUT_KEYS]
            return Task.from_outputs(
                name, *columns, self.metric, self.numeric, self.tolerance, self._declared_higher_is_better
            )
        spans = None if self.spans is None else [self.spans[i] for i in indices]
        if self.token_ids:
            columns = {key: [values[i] for i in indices] for key, values in self.token_ids.items()}
            return Task.from_token_ids(
                name,
                *columns.values(),
                metric=self.metric,
                higher_is_better=self._declared_higher_is_better,
                spans=spans,
            )
        columns = [[getattr(self, key)[i] for i in indices] for key in TEXT_KEYS]
        return Task(name, *columns, metric=self.metric, higher_is_better=self._declared_higher_is_better, spans=spans)

    def subset(self, n: int) -> Task:
        """The first ``n`` examples."""
        if not 1 <= n <= len(self):
            raise CircuitsError(f"subset size must be between 1 and {len(self)} (the task's size), got {n}")
        return self._select(range(n))

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple[Task, Task]:
        """A random split into a discovery task and a held-out evaluation task."""
        if not 0 < test_fraction < 1:
            raise CircuitsError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
        n_test = round(len(self) * test_fraction)
        if not 0 < n_test < len(self):
            raise CircuitsError(f"a {test_fraction} split of {len(self)} examples leaves one side empty")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        test, discovery = sorted(order[:n_test]), sorted(order[n_test:])
        return self._select(discovery, f"{self.name}-discovery"), self._select(test, f"{self.name}-test")

    def to_jsonl(self, path: str | Path) -> Path:
        """One example a line: ``{"clean", "corrupted", "answers", "wrong_answers"}`` (``*_ids`` for id tasks;
        ``clean_ids``, ``corrupted_ids``, ``outputs``, ``positions`` for tasks scored at several positions)."""
        keys = OUTPUT_KEYS if self.per_position else ID_KEYS if self.token_ids else TEXT_KEYS
        columns = [self.token_ids[k] for k in keys] if self.token_ids else [getattr(self, k) for k in keys]
        rows = [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]
        for row, spans in zip(rows, self.spans or [], strict=False):
            row["spans"] = spans
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        return atomic_write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path, name: str | None = None, metric: Metric = "logit_diff") -> Task:
        """Read a JSONL task (AutoCircuit's ``"corrupt"`` key is accepted for ``"corrupted"``).

        Errors about an example name its file and line (blank lines count), then and later (``tokenize``,
        ``check``)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CircuitsError(f"cannot read task file {path}: {error.strerror or error}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise CircuitsError(f"{path}, line {line}: not UTF-8 text ({error.reason})") from None
        rows, numbers, spans = [], [], []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CircuitsError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            except RecursionError:
                raise CircuitsError(f"{path}, line {number}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise CircuitsError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            if "corrupt" in row and "corrupted" not in row:
                row["corrupted"] = row.pop("corrupt")
            keys = OUTPUT_KEYS if "outputs" in row else ID_KEYS if "clean_ids" in row else TEXT_KEYS
            missing = [key for key in keys if key not in row]
            if missing:
                raise CircuitsError(f"{path}, line {number}: missing {', '.join(map(repr, missing))}")
            if rows and rows[0][0] is not keys:
                raise CircuitsError(f"{path}, line {number}: mixes kinds of examples (text, token ids, outputs)")
            rows.append((keys, [row[key] for key in keys]))
            spans.append(row.get("spans"))
            numbers.append(number)
        if not rows:
            raise CircuitsError(f"task file {path} holds no examples")
        columns = [list(column) for column in zip(*(values for _, values in rows), strict=True)]
        name = name or path.stem
        try:
            if rows[0][0] is OUTPUT_KEYS:  # values written as floats are numeric outputs
                numeric = any(isinstance(value, float) for row in columns[2] if isinstance(row, list) for value in row)
                metric = "l2" if metric == "logit_diff" else metric
                task = cls.from_outputs(name, *columns, metric=metric, numeric=numeric)
            declared = None if all(row is None for row in spans) else spans  # a line without them: an error
            if rows[0][0] is ID_KEYS:
                task = cls.from_token_ids(name, *columns, metric=metric, spans=declared)
            elif rows[0][0] is TEXT_KEYS:
                task = cls(name, *columns, metric=metric, spans=declared)
        except CircuitsError as error:
            raise CircuitsError(_at_line(str(error), path, numbers)) from None
        task._origin = (path, numbers)
        return task

    # --- the model on the task -----------------------------------------------------------
    def baseline(self, model: Model, batch_size: int = 32) -> Baseline:
        """The metric on clean and corrupted prompts, and the clean accuracy."""
        import pandas as pd

        from .engine import patched_forward

        tokenized = self.check(model).to(model.device)
        frames = []
        with torch.no_grad():
            for batch in tokenized.batches(batch_size):
                runs = [
                    patched_forward(model, ids, batch.attention_mask, logit_positions=batch.positions).logits
                    for ids in (batch.clean_ids, batch.corrupted_ids)
                ]
                clean = metric_values(self.metric, runs[0], batch, runs[0])
                corrupted = metric_values(self.metric, runs[1], batch, runs[0])
                frames.append(
                    pd.DataFrame(
                        {
                            "clean": clean.cpu().numpy(),
                            "corrupted": corrupted.cpu().numpy(),
                            "correct": correct(runs[0], batch).cpu().numpy(),
                        },
                        index=range(batch.start, batch.start + len(batch)),
                    )
                )
        table = pd.concat(frames)
        return Baseline(float(table.clean.mean()), float(table.corrupted.mean()), float(table.correct.mean()), table)


# --- helpers ---------------------------------------------------------------------------------


def _at_line(message: str, path: Path, lines: list[int]) -> str:
    """A message about ``example i`` of a file's task as one about the file line that holds it."""
    match = re.match(r"example (\d+)\b", message)
    if match is None or int(match[1]) >= len(lines):
        return f"{path}: {message}"
    return f"{path}, line {lines[int(match[1])]}{message[match.end() :]}"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise CircuitsError(f"a task needs a non-empty name, got {name!r}")
    return name


def _check_metric(metric: Metric) -> Metric:
    if callable(metric) or metric in METRICS:
        return metric
    raise CircuitsError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or pass a callable")


def _check_lengths(name: str, **columns: Sequence) -> None:
    for field, values in columns.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise CircuitsError(f"task {name!r}: {field} must be a list, got {type(values).__name__}")
    sizes = {field: len(values) for field, values in columns.items()}
    first = next(iter(sizes))
    if sizes[first] == 0:
        raise CircuitsError(f"task {name!r} is empty: it needs at least one example")
    for field, size in sizes.items():
        if size != sizes[first]:
            raise CircuitsError(f"task {name!r}: {first} has {sizes[first]} entries but {field} has {size}")


def _check_id_pair(i: int, columns: dict[str, Sequence]) -> None:
    """Example ``i``'s clean and corrupted prompts are token-id lists of the same length."""
    for field, ids in columns.items():
        if not _is_id_list(ids[i]):
            raise CircuitsError(f"example {i}: {field} must be a non-empty list of token ids, got {ids[i]!r}")
    clean, corrupted = columns["clean_ids"][i], columns["corrupted_ids"][i]
    if len(clean) != len(corrupted):
        raise CircuitsError(
            f"example {i}: the clean prompt has {len(clean)} tokens but the corrupted prompt has "
            f"{len(corrupted)}; the two prompts of a pair must have equal length"
        )


def _is_id_list(ids: Any) -> bool:
    return (
        isinstance(ids, Sequence)
        and not isinstance(ids, (str, bytes))
        and len(ids) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_ID for t in ids)
    )


def _as_lists(name: str, field: str, column: Any, dims: tuple[int, ...], numbers: bool = False) -> Any:
    """A column as users hold it, with its tensors, numpy arrays and numpy scalars made Python lists and numbers.

    ``column`` is a list of examples (each maybe a tensor or array of one dimension fewer) or one tensor or
    array of ``dims`` dimensions whose first indexes the examples. Arrays must hold integers (``numbers``:
    or floats). Anything else is returned as given, for the usual checks to judge.
    """
    if isinstance(column, np.ndarray) and column.dtype == object:  # ragged rows
        column = list(column)
    if _is_array(column):
        return _array_values(column, f"task {name!r}: {field}", dims, numbers)
    if not isinstance(column, (list, tuple)):
        return column
    inner = tuple(d - 1 for d in dims)
    return [
        _array_values(value, f"example {i}: {field}", inner, numbers) if _is_array(value) else _plain_numbers(value)
        for i, value in enumerate(column)
    ]


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (isinstance(value, np.ndarray) and value.dtype != object)


def _array_values(array: torch.Tensor | np.ndarray, what: str, dims: tuple[int, ...], numbers: bool) -> Any:
    kind = type(array).__name__
    if array.ndim not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise CircuitsError(f"{what} must be {expected}, got a {array.ndim}-D {kind} of shape {tuple(array.shape)}")
    if isinstance(array, torch.Tensor):
        floating, complex_ = array.is_floating_point(), array.is_complex()
        dtype = "bool" if array.dtype == torch.bool else "float" if floating else "other" if complex_ else "int"
    else:
        dtype = {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(array.dtype.kind, "other")
    if dtype != "int" and not (numbers and dtype == "float"):
        expected = "integers or floats" if numbers else "integer ids"
        raise CircuitsError(f"{what} must hold {expected}, got a {kind} of dtype {array.dtype}")
    return array.tolist()


def _plain_numbers(value: Any) -> Any:
    """Numpy scalars and 0-d tensors as Python numbers, arrays as lists, inside lists and tuples too."""
    if isinstance(value, (list, tuple)):
        return [_plain_numbers(item) for item in value]
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return value.item()
    return value.tolist() if _is_array(value) else value


def _answer_set(answer: Any, kind: type, what: str) -> list:
    """An answer as a non-empty list of ``kind`` (str or token id)."""

    def valid(item: Any) -> bool:
        if kind is int:
            return isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= MAX_ID
        return isinstance(item, str) and item != ""

    items = answer if isinstance(answer, (list, tuple)) else [answer]
    if not items or not all(valid(item) for item in items):
        expected = "a token id or a non-empty list of them" if kind is int else "a string or a non-empty list of them"
        raise CircuitsError(f"{what} must be {expected}, got {answer!r}")
    return list(items)


def _check_positions(positions: Any, length: int, what: str) -> None:
    valid = (
        isinstance(positions, Sequence)
        and not isinstance(positions, (str, bytes))
        and len(positions) > 0
        and all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < length for p in positions)
    )
    if not valid or len(set(positions)) != len(positions):
        raise CircuitsError(
            f"{what}: positions must be a non-empty list of distinct positions in 0..{length - 1}, got {positions!r}"
        )


def _check_outputs(outputs: Any, count: int, numeric: bool, what: str) -> None:
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence) or len(outputs) != count:
        raise CircuitsError(
            f"{what}: outputs must be a list of {count} values (one per scored position), got {outputs!r}"
        )
    for value in outputs:
        if numeric:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
        else:
            valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID
        if not valid:
            expected = "a finite number" if numeric else "an output id (an integer in 0..2**63-1)"
            raise CircuitsError(f"{what}: output {value!r} is not {expected}")


def _plain(answers: Sequence) -> list:
    return [[int(a) for a in answer] if isinstance(answer, (list, tuple)) else int(answer) for answer in answers]


def _single_tokens(tokenizer, answer: str | Sequence[str], what: str) -> list[int]:
    ids = []
    for text in _answer_set(answer, str, what):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise CircuitsError(
                f"{what} {text!r} is {len(pieces)} tokens {tokenizer.convert_ids_to_tokens(pieces)}; "
                "answers must be single tokens"
            )
        ids.append(pieces[0])
    return ids


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def _pack(clean_ids, corrupted_ids, answer_ids, wrong_ids) -> TokenizedTask:
    clean, attention = _pad(clean_ids)
    corrupted, _ = _pad(corrupted_ids)
    answers, answer_mask = _pad([a if isinstance(a, list) else [a] for a in answer_ids])
    wrong, wrong_mask = _pad([w if isinstance(w, list) else [w] for w in wrong_ids])
    positions = attention.sum(1) - 1
    return TokenizedTask(clean, corrupted, attention.long(), positions, answers, answer_mask, wrong, wrong_mask)


def _with_spans(tokenized: TokenizedTask, positions: list[dict[str, list[int]]] | None) -> TokenizedTask:
    """``tokenized`` with the span index of every position, from each example's span -> token positions."""
    if positions is None:
        return tokenized
    names = tuple(positions[0])
    return replace(tokenized, span_ids=span_ids(names, positions, tokenized.clean_ids.shape[1]), span_names=names)


def _pack_outputs(clean_ids, corrupted_ids, outputs, positions, numeric: bool, tolerance: float) -> TokenizedTask:
    clean, attention = _pad(clean_ids)
    corrupted, _ = _pad(corrupted_ids)
    output_mask = torch.zeros_like(attention)
    targets = torch.zeros(attention.shape)
    for i, (row, values) in enumerate(zip(positions, outputs, strict=True)):
        output_mask[i, row] = True
        targets[i, row] = torch.tensor(values, dtype=targets.dtype)
    none = torch.zeros(len(clean), 0, dtype=torch.long)
    empty = none.bool()
    return TokenizedTask(
        clean, corrupted, attention.long(), None, none, empty, none, empty, 0, output_mask, targets, numeric, tolerance
    )


__all__ = ["HIGHER_IS_BETTER", "REFERENCE_METRICS", "Baseline", "Task", "TokenizedTask", "correct", "metric_values"]
