"""What every method shares: argument checks, batches with their ablation values, the averaged metric."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine import patching_values, source_outputs
from ..model import Model
from ..task import Task, TokenizedTask, metric_values

ABLATIONS = ("patching", "mean", "zero")


@dataclass
class Batch:
    tokens: TokenizedTask  # on the model's device
    patch: torch.Tensor | None  # ablation values for the engine; None = zero
    n_total: int  # examples in the whole task: a batch's metric sum is divided by it


def check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def check_positive(what: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def batches(model: Model, task: Task, ablation: str, batch_size: int, progress: bool = False) -> Iterator[Batch]:
    """The task in batches with their ablation values; patching values are computed one batch at a time."""
    tokenized = task.tokenize(model.tokenizer).to(model.device)
    mean = task_mean(model, tokenized, batch_size) if ablation == "mean" else None
    for tokens in tqdm(list(tokenized.batches(batch_size)), desc="batches", disable=not progress, leave=False):
        if ablation == "patching":
            patch = patching_values(model, tokens.attention_mask, tokens.corrupted_ids, tokens.attention_mask)
        else:
            patch = mean
        yield Batch(tokens, patch, len(tokenized))


def task_mean(model: Model, tokenized: TokenizedTask, batch_size: int) -> torch.Tensor:
    """Each source's output averaged over all clean prompts and their real positions, ``[n_src, 1, 1, D]``."""
    total, count = None, 0
    for tokens in tokenized.batches(batch_size):
        outputs = source_outputs(model, tokens.clean_ids, tokens.attention_mask)
        weights = tokens.attention_mask.to(outputs.dtype)[None, :, :, None]
        summed = (outputs * weights).sum((1, 2))
        total = summed if total is None else total + summed
        count += int(tokens.attention_mask.sum())
    return (total / count)[:, None, None, :]


def metric_sum(task: Task, logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor) -> torch.Tensor:
    """This batch's share of the task-mean metric: the sum over its examples divided by the task size."""
    return metric_values(task.metric, logits, batch.tokens, clean_logits).sum() / batch.n_total
