"""Exact activation patching: one patched forward per edge (or node), resuming from the clean prefix.

score = mean metric(edge ablated) - mean metric(clean). Ablating an edge into layer L leaves
everything before L as in the clean run, so each patched forward computes only layers L onward
(``PrefixCache``), and the ablations of one layer run side by side as copies of the batch, as
many per forward as ``max_tokens`` allows.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..engine import PrefixCache
from ..model import Model
from ..task import Task
from .common import batches, metric_sum


def exact_scores(
    model: Model, task: Task, ablation: str, batch_size: int, level: str, progress: bool, max_tokens: int = 8192
) -> torch.Tensor:
    """Exact scores; up to ``max_tokens`` tokens (copies of a batch, one ablation each) per forward."""
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
    scores = torch.zeros(graph.n_src, graph.n_dst) if level == "edge" else torch.zeros(graph.n_src)
    for batch in batches(model, task, ablation, batch_size, progress):
        tokens = batch.tokens
        cache = PrefixCache(model, tokens.clean_ids, tokens.attention_mask, batch.patch, tokens.positions)
        clean = cache.base_logits
        baseline = metric_sum(task, clean, batch, clean)
        copies = max(1, max_tokens // tokens.clean_ids.numel())
        with tqdm(total=len(units), desc="exact", disable=not progress, leave=False) as bar:
            for layer in sorted(by_layer, reverse=True):
                group = by_layer[layer]
                for start in range(0, len(group), copies):
                    chunk = group[start : start + copies]
                    for (u, v), logits in zip(chunk, cache.run_ablations(chunk, layer), strict=True):
                        effect = (metric_sum(task, logits, batch, clean) - baseline).cpu()
                        scores[(u, v) if level == "edge" else u] += effect
                    bar.update(len(chunk))
    return scores
