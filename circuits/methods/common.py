"""What every method shares: batches with their ablation values, the averaged metric."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine import mean_values, patching_values
from ..model import Model
from ..task import Task, TokenizedTask, metric_values


@dataclass
class Batch:
    tokens: TokenizedTask  # on the model's device
    patch: torch.Tensor | None  # ablation values for the engine; None = zero
    n_total: int  # examples in the whole task: a batch's metric sum is divided by it


def batches(model: Model, task: Task, ablation: str, batch_size: int, progress: bool = False) -> Iterator[Batch]:
    """The task in batches with their ablation values; patching values are computed one batch at a time."""
    tokenized = task.tokenize(model.tokenizer).to(model.device)
    mean = None
    if ablation == "mean":  # over the whole task's clean prompts, not per batch
        mean = mean_values(model, ((t.clean_ids, t.attention_mask) for t in tokenized.batches(batch_size)))
    for tokens in tqdm(list(tokenized.batches(batch_size)), desc="batches", disable=not progress, leave=False):
        if ablation == "patching":
            patch = patching_values(model, tokens.attention_mask, tokens.corrupted_ids, tokens.attention_mask)
        else:
            patch = mean
        yield Batch(tokens, patch, len(tokenized))


def metric_sum(task: Task, logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor) -> torch.Tensor:
    """This batch's share of the task-mean metric: the sum over its examples divided by the task size."""
    return metric_values(task.metric, logits, batch.tokens, clean_logits).sum() / batch.n_total
