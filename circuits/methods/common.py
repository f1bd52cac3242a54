"""What every method shares: batches with their ablation values, the averaged metric, running sums."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..batching import BatchPlan, BatchSize
from ..engine import mlp_hidden_values, mlp_width, patching_values, source_outputs, unchanged_prefix
from ..errors import CircuitsError
from ..model import Model
from ..resume import Checkpoint
from ..spans import REST, Spans, layout
from ..task import Task, TokenizedTask, metric_values


@dataclass
class Batch:
    tokens: TokenizedTask  # on the model's device
    patch: torch.Tensor | None  # ablation values for the engine; None = zero
    n_total: int  # examples in the whole task: a batch's metric sum is divided by it
    start: int = 0  # every pair shares the positions before it (patching in a causal model; else 0)
    trimmed: bool = False  # the patch holds positions ``start`` on only (it cannot feed a patched forward)
    index: int = 0  # the batch's place in the plan's layout
    hidden_patch: torch.Tensor | None = None  # the MLP hidden units' ablation values (``mlp-neuron``); None = zero


@dataclass(frozen=True)
class Resolution:
    """How finely a method resolves the graph: ``level`` (``circuits.choices.LEVELS``) and, for edges resolved by
    position, the task's spans with each example's span index of every position ``[N, T]``."""

    level: str = "edge"
    spans: Spans | None = None
    span_ids: torch.Tensor | None = None

    def batch_spans(self, tokens: TokenizedTask, start: int = 0) -> torch.Tensor | None:
        """The span index of a batch's positions from ``start`` on, on the batch's device (None: not by span)."""
        if self.span_ids is None:
            return None
        rows = self.span_ids[tokens.start : tokens.start + len(tokens), start : tokens.clean_ids.shape[1]]
        return rows.to(tokens.clean_ids.device)

    def shape(self, model: Model) -> tuple[int, ...]:
        """The shape of the scores: ``[n_src, n_dst]`` edges (``[..., S]`` by span), ``[n_src]`` nodes,
        ``[n_src, d_model]`` the sources' output dimensions, ``[n_layers, d_mlp]`` the MLPs' hidden units."""
        graph = model.graph
        if self.level == "neuron":
            return (graph.n_src, model.adapter.d_model)
        if self.level == "mlp-neuron":
            return (graph.n_layers, mlp_width(model))
        if self.level == "node":
            return (graph.n_src,)
        return (graph.n_src, graph.n_dst) if self.spans is None else (graph.n_src, graph.n_dst, len(self.spans))


def resolution_of(model: Model, task: Task, level: str, positions: bool) -> Resolution:
    """The resolution ``attribute`` scores ``task`` at: ``level``; with ``positions``, edges by the task's declared
    spans (else every position on its own: prompts of one template)."""
    if not isinstance(positions, bool):
        raise CircuitsError(f"positions must be True or False, got {positions!r}")
    if not positions:
        return Resolution(level)
    if level != "edge":
        raise CircuitsError(f"positions resolve edges; level {level!r} takes positions=False")
    spans, ids = layout(task.check(model))
    return Resolution(level, spans, ids)


def spans_on(model: Model, task: Task, spans: Spans) -> Resolution:
    """The resolution that evaluates a circuit or scores by ``spans`` on ``task`` (which may be another task than
    the one they were made on): its positions grouped by the same span names."""
    tokenized = task.check(model)
    declared = tokenized.span_ids is not None and (*tokenized.span_names, REST) == spans.names
    own, ids = layout(tokenized, per_token=not declared)
    if own.names != spans.names:
        shown = ", ".join(own.names[:8]) + (", ..." if len(own) > 8 else "")
        raise CircuitsError(
            f"the circuit is resolved by spans {', '.join(spans.names[:8])}{', ...' if len(spans) > 8 else ''} but "
            f"task {task.name!r} groups its positions into {shown}: use a task with the same spans"
        )
    return Resolution("edge", spans, ids)


EDGES = Resolution()  # the plain level: one score per edge


def batches(
    model: Model,
    task: Task,
    ablation: str,
    batch_size: BatchSize | BatchPlan,
    progress: bool = False,
    start: int = 0,
    trim: bool = False,
    owned: Callable[[int], bool] | None = None,
    hidden: bool = False,
) -> Iterator[Batch]:
    """The task in batches with their ablation values; patching values are computed one batch at a time.

    ``batch_size``: examples per batch, ``"auto"``, or the ``circuits.batching.BatchPlan`` that lays the
    batches out (it records their sizes, so that a computation resumed at batch ``start`` replays them).
    ``start``: the index of the first batch to yield (a resumed computation skips the batches it has done).
    ``trim``: patching values only from the first position where a pair of the batch differs (``Batch.start``):
    before it every source's output is the clean one, so a computation that only needs the deltas skips it.
    ``owned``: yield only the batches whose index it accepts (a rank's share, see ``circuits.distributed``).
    ``hidden``: also the MLP hidden units' ablation values (``Batch.hidden_patch``, the ``mlp-neuron`` level).
    """
    plan = BatchPlan.of(batch_size, model.device)
    make = _BatchMaker(model, task, ablation, plan, trim, hidden)
    with _examples_bar(len(make.lengths), progress) as bar:
        bar.update(sum(plan.sizes[:start]))
        for index, (offset, size) in enumerate(plan.spans(make.lengths, start), start):
            if owned is None or owned(index):
                yield make(index, offset, size)
            bar.update(size)


def batch_results(
    model: Model,
    task: Task,
    ablation: str,
    plan: BatchPlan,
    compute: Callable[[Batch], torch.Tensor],
    progress: bool = False,
    start: int = 0,
    trim: bool = False,
    hidden: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, compute(batch))`` for batch ``start`` onward, in order; under torch.distributed each batch is
    computed by one rank and every rank gets every result (``span_results``)."""
    make = _BatchMaker(model, task, ablation, plan, trim, hidden)
    yield from span_results(plan, make.lengths, start, lambda *span: compute(make(*span)), progress)


def span_results(
    plan: BatchPlan,
    lengths: list[int],
    start: int,
    compute: Callable[[int, int, int], torch.Tensor],
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, compute(index, first example, examples))`` for every batch ``plan`` lays out from ``start`` on,
    in order.

    Under torch.distributed every rank gets the same sequence: in each round of ``world_size`` batches rank r
    computes the r-th and the results are exchanged (``circuits.distributed.exchange``: they arrive in float64,
    callers convert them); a probe batch of an automatic plan is a round of its own, on rank 0. A failure on
    any rank raises on every rank, with the plan's current batch set to the failed one (``halve`` halves it).
    """
    ranks, me = distributed.world_size(), distributed.rank()
    round_: list[tuple[int, int, int]] = []  # (index, first example, examples)

    def failed(slot: int) -> str:
        index, offset, size = round_[slot]
        plan.current = index
        return f"batch {index} (examples {offset}-{offset + size - 1})"

    def run_round() -> Iterator[tuple[int, torch.Tensor]]:
        mine = round_[me] if me < len(round_) else None
        own = None if mine is None else partial(compute, *mine)
        results = [own()] if ranks == 1 else distributed.exchange(own, me, ranks, failed)
        for (index, _, size), result in zip(round_, results, strict=False):
            yield index, result
            bar.update(size)
        round_.clear()

    with _examples_bar(len(lengths), progress) as bar:
        bar.update(sum(plan.sizes[:start]))
        for index, (offset, size) in enumerate(plan.spans(lengths, start), start):
            round_.append((index, offset, size))
            if plan.probing or len(round_) == ranks:  # a probe's measurement sizes the batches after it
                yield from run_round()
        if round_:
            yield from run_round()


def _examples_bar(total: int, progress: bool) -> tqdm:
    """The examples' progress bar: shown when asked for, and under torch.distributed on rank 0 only."""
    return tqdm(desc="examples", total=total, disable=not (progress and distributed.is_main()), leave=False)


class _BatchMaker:
    """Batches of one task with their ablation values, from ``(first example, examples)`` spans."""

    def __init__(self, model: Model, task: Task, ablation: str, plan: BatchPlan, trim: bool, hidden: bool = False):
        self.model, self.ablation, self.trim, self.hidden = model, ablation, trim, hidden
        self.tokenized = task.check(model).to(model.device)  # a prompt too long, an id outside the vocabulary
        self.lengths = self.tokenized.attention_mask.sum(1).tolist()
        self.mean = self.hidden_mean = None
        if ablation == "mean":  # over the whole task's clean prompts, not per batch; kept by the plan for retries
            if plan.mean is None:
                plan.mean = ablation_mean(model, self.tokenized, plan.sub_plan())
            self.mean = plan.mean.to(device=model.device, dtype=model.dtype)
            if hidden:
                if plan.hidden_mean is None:
                    plan.hidden_mean = ablation_mean(model, self.tokenized, plan.sub_plan(), mlp_hidden_values)
                self.hidden_mean = plan.hidden_mean.to(device=model.device, dtype=model.dtype)

    def __call__(self, index: int, offset: int, size: int) -> Batch:
        tokens, n, model = self.tokenized[offset : offset + size], len(self.lengths), self.model
        if self.ablation != "patching":
            return Batch(tokens, self.mean, n, index=index, hidden_patch=self.hidden_mean)
        shared = unchanged_prefix(model, tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask)
        mask = tokens.attention_mask
        patch = patching_values(model, mask, tokens.corrupted_ids, mask, shared if self.trim else 0)
        hidden = mlp_hidden_values(model, tokens.corrupted_ids, mask) if self.hidden else None
        return Batch(tokens, patch, n, shared, self.trim, index, hidden)


def ablation_mean(
    model: Model, tokenized: TokenizedTask, plan: BatchPlan, values: Callable | None = None
) -> torch.Tensor:
    """The ``mean`` ablation values: each source's output averaged over the clean prompts' real positions,
    ``[n_src, 1, 1, D]`` in the model's dtype, summed in float32 over batches laid out by ``plan``
    (``values=mlp_hidden_values``: the MLPs' hidden units, ``[n_layers, 1, 1, d_mlp]``)."""
    values = values or source_outputs
    lengths = tokenized.attention_mask.sum(1).tolist()
    sums: list[torch.Tensor] = []

    def batch_sum(index: int, offset: int, size: int) -> torch.Tensor:
        tokens = tokenized[offset : offset + size]
        outputs = values(model, tokens.clean_ids, tokens.attention_mask)
        mask = tokens.attention_mask.to(outputs.dtype)[None, :, :, None]
        return (outputs * mask).sum((1, 2), dtype=torch.float32)

    def add(item: tuple[int, torch.Tensor]) -> None:
        sums.append(item[1].float())

    plan.each(lambda start: span_results(plan, lengths, start, batch_sum), add)
    total = torch.stack(sums).sum(0) if len(sums) > 1 else sums[0]
    return (total / tokenized.attention_mask.sum()).to(model.dtype)[:, None, None, :]


def metric_sum(task: Task, logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor) -> torch.Tensor:
    """This batch's share of the task-mean metric: the sum over its examples divided by the task size."""
    return metric_values(task.metric, logits, batch.tokens, clean_logits).sum() / batch.n_total


def resumed_sum(checkpoint: Checkpoint | None, zeros: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The running score sum and the next batch index saved in ``checkpoint`` (``zeros`` and 0 if none)."""
    saved = None if checkpoint is None else checkpoint.load()
    if saved is None:
        return zeros, 0
    scores, start = saved.tensors.get("scores"), saved.state.get("next")
    if scores is None or scores.shape != zeros.shape or not isinstance(start, int) or start < 0:
        raise CircuitsError(f"checkpoint {checkpoint.path} holds no running score sum of this model; delete it")
    return scores.to(zeros.dtype), start


def save_sum(checkpoint: Checkpoint | None, scores: torch.Tensor, next_batch: int) -> None:
    """Save the running score sum and the index of the next batch to ``checkpoint`` (if any)."""
    if checkpoint is not None:
        checkpoint.save({"next": next_batch}, {"scores": scores})
