"""Exact activation patching: one patched forward per edge (or node), resuming from the clean prefix.

score = mean metric(edge ablated) - mean metric(clean). Ablating an edge into layer L leaves
everything before L as in the clean run, so each patched forward computes only layers L onward
(``PrefixCache``). Units are visited from the last layer down so the cache never has to restore rows.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..engine import PrefixCache
from ..graph import Graph
from ..model import Model
from ..task import Task
from .common import batches, metric_sum


def destination_layer(graph: Graph, destination: int) -> int:
    """The layer whose computation reads ``destination`` (``n_layers`` for the logits)."""
    for slots in graph.layers:
        if destination <= slots.mlp_destination:
            return slots.layer
    return graph.n_layers


def first_reader_layer(graph: Graph, source: int) -> int:
    """The earliest layer in which some destination reads ``source``."""
    readers = graph.real[source].nonzero().flatten()
    return destination_layer(graph, int(readers[0]))


def exact_scores(model: Model, task: Task, ablation: str, batch_size: int, level: str, progress: bool) -> torch.Tensor:
    graph = model.graph
    if level == "edge":
        units = [(destination_layer(graph, int(j)), (int(i), int(j))) for i, j in graph.real.nonzero()]
    else:
        units = [(first_reader_layer(graph, i), (i, slice(None))) for i in range(graph.n_src)]
    units.sort(key=lambda unit: -unit[0])
    scores = torch.zeros(graph.n_src, graph.n_dst) if level == "edge" else torch.zeros(graph.n_src)
    ones = torch.ones(graph.n_src, graph.n_dst, dtype=model.dtype, device=model.device)
    for batch in batches(model, task, ablation, batch_size, progress):
        tokens = batch.tokens
        cache = PrefixCache(model, tokens.clean_ids, tokens.attention_mask, batch.patch, tokens.positions)
        clean = cache.base_logits
        baseline = metric_sum(task, clean, batch, clean)
        for layer, index in tqdm(units, desc="exact", disable=not progress, leave=False):
            edge_mask = ones.clone()
            edge_mask[index] = 0
            effect = (metric_sum(task, cache.run(edge_mask, layer), batch, clean) - baseline).cpu()
            scores[index if level == "edge" else index[0]] += effect
    return scores
