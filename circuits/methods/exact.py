"""Exact activation patching: one patched forward per edge (or node), resuming from the clean prefix.

score = mean metric(edge ablated) - mean metric(clean). Ablating an edge into layer L leaves
everything before L as in the clean run, so each patched forward computes only layers L onward
(``PrefixCache``), and the ablations of one layer run side by side as copies of the batch, as
many per forward as ``max_tokens`` allows. Under torch.distributed every rank runs every batch's clean
prefix and takes every world-size-th unit of each layer (``circuits.distributed.sum_owned``).
"""

from __future__ import annotations

from functools import partial

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..batching import BatchPlan
from ..engine import PrefixCache
from ..model import Model
from ..resume import Checkpoint
from ..task import Task
from .common import Batch, batches, metric_sum, resumed_sum, save_sum

MAX_TOKENS = 8192  # tokens per patched forward (copies of a batch, one ablation each)


def exact_scores(
    model: Model,
    task: Task,
    ablation: str,
    batch_size: int | str | BatchPlan,
    level: str,
    progress: bool,
    max_tokens: int = MAX_TOKENS,
    checkpoint: Checkpoint | None = None,
) -> torch.Tensor:
    """Exact scores; up to ``max_tokens`` tokens (copies of a batch, one ablation each) per forward. With
    ``checkpoint``, the running sum and the next batch are saved after each batch and resumed from.
    ``batch_size`` may be a ``circuits.batching.BatchPlan``: each time it halved after running out of
    memory, ``max_tokens`` halves too (more copies of a smaller batch would take the same memory)."""
    graph = model.graph
    if level == "edge":
        rows, cols = graph.real.nonzero(as_tuple=True)
        layers = graph.destination_layers[cols].tolist()
        units = [(layer, (i, j)) for layer, i, j in zip(layers, rows.tolist(), cols.tolist(), strict=True)]
    else:
        units = [(graph.first_reader_layer(i), (i, None)) for i in range(graph.n_src)]
    by_layer: dict[int, list[tuple[int, int | None]]] = {}
    for layer, unit in units:
        by_layer.setdefault(layer, []).append(unit)
    zeros = torch.zeros(graph.n_src, graph.n_dst) if level == "edge" else torch.zeros(graph.n_src)
    scores, start = resumed_sum(checkpoint, zeros)
    for index, batch in enumerate(batches(model, task, ablation, batch_size, progress, start), start):
        tokens = max(1, max_tokens >> getattr(batch_size, "halvings", 0))  # read after the checkpoint restored it
        # under torch.distributed each rank computes its share of the units, and every rank adds them all
        effects = partial(_batch_effects, scores.shape, model, task, batch, by_layer, level, tokens, progress)
        scores += distributed.sum_owned(effects, f"the exact scores of batch {index}").float()
        save_sum(checkpoint, scores, index + 1)
    return scores


def _batch_effects(
    shape: torch.Size,
    model: Model,
    task: Task,
    batch: Batch,
    by_layer: dict[int, list[tuple[int, int | None]]],
    level: str,
    max_tokens: int,
    progress: bool,
) -> torch.Tensor:
    """One batch's effect of every ablation unit this rank owns (under torch.distributed, every world-size-th
    unit of each layer; else all), zeros elsewhere."""
    tokens = batch.tokens
    effects = torch.zeros(shape)
    cache = PrefixCache(model, tokens.clean_ids, tokens.attention_mask, batch.patch, tokens.positions)
    clean = cache.base_logits
    baseline = metric_sum(task, clean, batch, clean)
    copies = max(1, max_tokens // tokens.clean_ids.numel())
    owned = {layer: [unit for k, unit in enumerate(group) if distributed.owns(k)] for layer, group in by_layer.items()}
    total = sum(map(len, owned.values()))
    with tqdm(total=total, desc="exact", disable=not (progress and distributed.is_main()), leave=False) as bar:
        for layer in sorted(owned, reverse=True):
            group = owned[layer]
            for start in range(0, len(group), copies):
                chunk = group[start : start + copies]
                for (u, v), logits in zip(chunk, cache.run_ablations(chunk, layer), strict=True):
                    effects[(u, v) if level == "edge" else u] = (
                        metric_sum(task, logits, batch, clean) - baseline
                    ).cpu()
                bar.update(len(chunk))
    return effects
