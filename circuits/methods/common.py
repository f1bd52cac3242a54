"""What every method shares: batches with their ablation values, the averaged metric, running sums."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..batching import BatchPlan, BatchSize
from ..engine import patching_values, source_outputs, unchanged_prefix
from ..errors import CircuitsError
from ..model import Model
from ..resume import Checkpoint
from ..task import Task, TokenizedTask, metric_values


@dataclass
class Batch:
    tokens: TokenizedTask  # on the model's device
    patch: torch.Tensor | None  # ablation values for the engine; None = zero
    n_total: int  # examples in the whole task: a batch's metric sum is divided by it
    start: int = 0  # every pair shares the positions before it (patching in a causal model; else 0)
    trimmed: bool = False  # the patch holds positions ``start`` on only (it cannot feed a patched forward)


def batches(
    model: Model,
    task: Task,
    ablation: str,
    batch_size: BatchSize | BatchPlan,
    progress: bool = False,
    start: int = 0,
    trim: bool = False,
) -> Iterator[Batch]:
    """The task in batches with their ablation values; patching values are computed one batch at a time.

    ``batch_size``: examples per batch, ``"auto"``, or the ``circuits.batching.BatchPlan`` that lays the
    batches out (it records their sizes, so that a computation resumed at batch ``start`` replays them).
    ``start``: the index of the first batch to yield (a resumed computation skips the batches it has done).
    ``trim``: patching values only from the first position where a pair of the batch differs (``Batch.start``):
    before it every source's output is the clean one, so a computation that only needs the deltas skips it.
    """
    plan = BatchPlan.of(batch_size, model.device)
    tokenized = task.check(model).to(model.device)  # a prompt too long, an id outside the vocabulary: named now
    mean = None
    if ablation == "mean":  # over the whole task's clean prompts, not per batch; kept by the plan for retries
        if plan.mean is None:
            plan.mean = ablation_mean(model, tokenized, plan.sub_plan())
        mean = plan.mean.to(device=model.device, dtype=model.dtype)
    lengths = tokenized.attention_mask.sum(1).tolist()
    n = len(lengths)
    bar = None
    for offset, size in plan.spans(lengths, start):
        if bar is None:
            bar = tqdm(desc="examples", initial=offset, total=n, disable=not progress, leave=False)
        tokens = tokenized[offset : offset + size]
        if ablation == "patching":
            shared = unchanged_prefix(model, tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask)
            first = shared if trim else 0
            mask = tokens.attention_mask
            yield Batch(tokens, patching_values(model, mask, tokens.corrupted_ids, mask, first), n, shared, trim)
        else:
            yield Batch(tokens, mean, n)
        bar.update(size)
    if bar is not None:
        bar.close()


def ablation_mean(model: Model, tokenized: TokenizedTask, plan: BatchPlan) -> torch.Tensor:
    """The ``mean`` ablation values: each source's output averaged over the clean prompts' real positions,
    ``[n_src, 1, 1, D]`` in the model's dtype, summed in float32 over batches laid out by ``plan``."""
    lengths = tokenized.attention_mask.sum(1).tolist()
    sums: list[torch.Tensor] = []

    def add(span: tuple[int, int]) -> None:
        tokens = tokenized[span[0] : span[0] + span[1]]
        outputs = source_outputs(model, tokens.clean_ids, tokens.attention_mask)
        mask = tokens.attention_mask.to(outputs.dtype)[None, :, :, None]
        sums.append((outputs * mask).sum((1, 2), dtype=torch.float32))

    plan.each(lambda start: plan.spans(lengths, start), add)
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
