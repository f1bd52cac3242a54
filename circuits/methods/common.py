"""What every method shares: batches with their ablation values, the averaged metric."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine import mean_values, patching_values
from ..errors import CircuitsError
from ..model import Model
from ..resume import Checkpoint
from ..task import Task, TokenizedTask, metric_values


@dataclass
class Batch:
    tokens: TokenizedTask  # on the model's device
    patch: torch.Tensor | None  # ablation values for the engine; None = zero
    n_total: int  # examples in the whole task: a batch's metric sum is divided by it


def batches(
    model: Model, task: Task, ablation: str, batch_size: int, progress: bool = False, start: int = 0
) -> Iterator[Batch]:
    """The task in batches with their ablation values; patching values are computed one batch at a time.

    ``start``: the index of the first batch to yield (a resumed computation skips the batches it has done).
    """
    tokenized = task.check(model).to(model.device)  # a prompt too long, an id outside the vocabulary: named now
    mean = None
    if ablation == "mean":  # over the whole task's clean prompts, not per batch
        mean = mean_values(model, ((t.clean_ids, t.attention_mask) for t in tokenized.batches(batch_size)))
    every = list(tokenized.batches(batch_size))
    bar = tqdm(every[start:], desc="batches", initial=start, total=len(every), disable=not progress, leave=False)
    for tokens in bar:
        if ablation == "patching":
            patch = patching_values(model, tokens.attention_mask, tokens.corrupted_ids, tokens.attention_mask)
        else:
            patch = mean
        yield Batch(tokens, patch, len(tokenized))


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
