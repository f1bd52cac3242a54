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
from ..engine import PrefixCache, patched_forward
from ..graph import Graph
from ..model import Model
from ..resume import Checkpoint
from ..task import Task
from .common import EDGES, Batch, Resolution, batches, metric_sum, resumed_sum, save_sum

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
    resolution: Resolution = EDGES,
) -> torch.Tensor:
    """Exact scores; up to ``max_tokens`` tokens (copies of a batch, one ablation each) per forward. With
    ``checkpoint``, the running sum and the next batch are saved after each batch and resumed from.
    ``batch_size`` may be a ``circuits.batching.BatchPlan``: each time it halved after running out of
    memory, ``max_tokens`` halves too (more copies of a smaller batch would take the same memory)."""
    graph = model.graph
    if resolution.level != level:
        resolution = Resolution(level)
    shape = resolution.shape(model)
    by_layer: dict[int, list[tuple]] = {}
    for layer, unit in _units(graph, resolution, shape[-1]):
        by_layer.setdefault(layer, []).append(unit)
    scores, start = resumed_sum(checkpoint, torch.zeros(shape))
    hidden = level == "mlp-neuron"
    for index, batch in enumerate(batches(model, task, ablation, batch_size, progress, start, hidden=hidden), start):
        tokens = max(1, max_tokens >> getattr(batch_size, "halvings", 0))  # read after the checkpoint restored it
        # under torch.distributed each rank computes its share of the units, and every rank adds them all
        effects = partial(
            _batch_effects, scores.shape, model, task, batch, by_layer, level, tokens, progress, resolution
        )
        scores += distributed.sum_owned(effects, f"the exact scores of batch {index}").float()
        save_sum(checkpoint, scores, index + 1)
    return scores


def _units(graph: Graph, resolution: Resolution, width: int) -> list[tuple[int, tuple]]:
    """Every unit ablated on its own, with the first layer it changes: ``(u, v)`` an edge, ``(u, v, s)`` an edge at
    span s, ``(u, None)`` a source node, ``(u, d)`` an output dimension, ``(l, j)`` an MLP hidden unit (``width``
    of them per source or layer)."""
    level = resolution.level
    if level == "edge":
        rows, cols = graph.real.nonzero(as_tuple=True)
        layers = graph.destination_layers[cols].tolist()
        edges = list(zip(layers, rows.tolist(), cols.tolist(), strict=True))
        if resolution.spans is None:
            return [(layer, (i, j)) for layer, i, j in edges]
        return [(layer, (i, j, s)) for layer, i, j in edges for s in range(len(resolution.spans))]
    if level == "node":
        return [(graph.first_reader_layer(i), (i, None)) for i in range(graph.n_src)]
    if level == "neuron":
        return [(graph.first_reader_layer(u), (u, d)) for u in range(graph.n_src) for d in range(width)]
    return [(layer, (layer, j)) for layer in range(graph.n_layers) for j in range(width)]


def _batch_effects(
    shape: torch.Size,
    model: Model,
    task: Task,
    batch: Batch,
    by_layer: dict[int, list[tuple]],
    level: str,
    max_tokens: int,
    progress: bool,
    resolution: Resolution = EDGES,
) -> torch.Tensor:
    """One batch's effect of every ablation unit this rank owns (under torch.distributed, every world-size-th
    unit of each layer; else all), zeros elsewhere."""
    tokens = batch.tokens
    effects = torch.zeros(shape)
    if level in ("neuron", "mlp-neuron"):
        return _neuron_effects(effects, model, task, batch, by_layer, level, progress)
    cache = PrefixCache(model, tokens.clean_ids, tokens.attention_mask, batch.patch, tokens.positions)
    spans = resolution.batch_spans(tokens)
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
                for unit, logits in zip(chunk, cache.run_ablations(chunk, layer, spans), strict=True):
                    effects[unit if level == "edge" else unit[0]] = (
                        metric_sum(task, logits, batch, clean) - baseline
                    ).cpu()
                bar.update(len(chunk))
    return effects


def _neuron_effects(
    effects: torch.Tensor,
    model: Model,
    task: Task,
    batch: Batch,
    by_layer: dict[int, list[tuple]],
    level: str,
    progress: bool,
) -> torch.Tensor:
    """The neuron levels' exact effects: one patched forward per output dimension or hidden unit (small models:
    ``d_model`` or ``d_mlp`` forwards per source or layer)."""
    tokens = batch.tokens
    run = partial(patched_forward, model, tokens.clean_ids, tokens.attention_mask, logit_positions=tokens.positions)
    with torch.no_grad():
        clean = run().logits
    baseline = metric_sum(task, clean, batch, clean)
    owned = [unit for group in by_layer.values() for k, unit in enumerate(group) if distributed.owns(k)]
    ones = torch.ones(effects.shape, dtype=model.dtype, device=model.device)
    shown = progress and distributed.is_main()
    with torch.no_grad(), tqdm(total=len(owned), desc="exact", disable=not shown, leave=False) as bar:
        for unit in owned:
            mask = ones.clone()
            mask[unit] = 0
            if level == "neuron":
                logits = run(patch=batch.patch, neuron_mask=mask).logits
            else:
                logits = run(hidden_mask=mask, hidden_patch=batch.hidden_patch).logits
            effects[unit] = (metric_sum(task, logits, batch, clean) - baseline).cpu()
            bar.update(1)
    return effects
