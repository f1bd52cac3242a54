"""ACDC (Conmy et al. 2023): greedy edge removal in reverse topological order.

The algorithm, exactly:

1. Start from the candidate edges (all edges by default); every other edge is removed from
   the start. ``current`` = the metric with the candidate mask.
2. Visit destinations in reverse topological order: ``logits``; then for each layer from the
   last down, its MLP input, then its attention inputs in reverse index order (v of the last
   key/value head first, q of head 0 last).
3. A destination none of whose nodes (the head or MLP it feeds; for a key/value input, every
   query head of its group) has a remaining outgoing edge has all its incoming edges removed
   without evaluation: nothing it computes reaches the logits.
4. Otherwise, for each remaining incoming edge, sources in reverse forward order: remove it
   tentatively; if the metric moves by at most ``threshold`` (|new - current| <= threshold) the
   removal stands and ``current`` = new; else the edge is restored.

The metric is the task-mean of ``kl`` (KL(clean || patched)) or of the task's metric names.
Everything before a destination's layer is the same in every step at that destination, so each
step resumes from a cached prefix (``PrefixCache``) and computes only the rest of the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..choices import ABLATIONS, METRICS, Ablation, MetricName, check_choice, check_positive
from ..circuit import Circuit, edge_mask_from
from ..engine import PrefixCache, patched_forward
from ..errors import CircuitsError
from ..graph import Graph
from ..io import atomic_write_text
from ..model import Model
from ..task import Task, metric_values
from .common import batches

CHECKPOINT_VERSION = 1


def destination_order(graph: Graph) -> list[int]:
    """Destinations in the order ACDC visits them (step 2 of the module docstring)."""
    order = [graph.n_dst - 1]
    for slots in reversed(graph.layers):
        order.append(slots.mlp_destination)
        order.extend(reversed(range(slots.attention_destinations.start, slots.attention_destinations.stop)))
    return order


def acdc(
    model: Model,
    task: Task,
    threshold: float,
    metric: MetricName = "kl",
    ablation: Ablation = "patching",
    candidates: Any = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 32,
    reuse_prefix: bool = True,
) -> Circuit:
    """Run ACDC; returns the circuit with ``meta`` (forward-pass equivalents, steps, metric).

    ``candidates``: edge names, a Circuit or a boolean mask restricting the search; every other
    edge counts as removed. ``checkpoint``: a JSON file written atomically after every destination;
    calling again with the same path resumes where it stopped and gives the identical circuit.
    ``reuse_prefix=False`` runs every step as a whole forward (for benchmarks; same circuit).
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
        raise CircuitsError(f"threshold must be a number >= 0, got {threshold!r}")
    check_choice("metric", metric, METRICS)
    check_choice("ablation", ablation, ABLATIONS)
    check_positive("batch_size", batch_size)
    graph = model.graph
    kept = graph.real.clone() if candidates is None else edge_mask_from(graph, candidates)
    config = {
        "model": model.name,
        "task": task.name,
        "n": len(task),
        "threshold": float(threshold),
        "metric": metric,
        "ablation": ablation,
        "candidates": int(kept.sum()),
    }
    order = destination_order(graph)
    state = _load_checkpoint(checkpoint, config, graph) if checkpoint else None
    base_mask = kept.to(model.dtype).to(model.device)
    # the prefix before each layer is computed with the candidate mask, which ACDC has not touched there
    scorer = _Scorer(model, task, metric, ablation, batch_size, base_mask, reuse_prefix)
    if state is None:
        state = {"next": 0, "current": scorer.evaluate(base_mask, graph.n_layers), "steps": 0}
    else:
        kept = state.pop("kept")
    bar = tqdm(total=len(order), initial=state["next"], desc="ACDC destinations", disable=not progress)
    for position in range(state["next"], len(order)):
        destination = order[position]
        layer = graph.destination_layer(destination)
        nodes = graph.fed_nodes(destination)
        incoming = kept[:, destination].nonzero().flatten().tolist()[::-1]
        if nodes and not kept[nodes].any():
            kept[:, destination] = False
            incoming = []
        for source in incoming:
            kept[source, destination] = False
            value = scorer.evaluate(kept.to(model.dtype).to(model.device), layer)
            state["steps"] += 1
            if abs(value - state["current"]) <= threshold:
                state["current"] = value
            else:
                kept[source, destination] = True
            bar.set_postfix(edges_visited=state["steps"], edges_kept=int(kept.sum()))
        state["next"] = position + 1
        if checkpoint:
            _save_checkpoint(checkpoint, config, state, kept, graph)
        bar.update(1)
    bar.close()
    equivalents = scorer.forward_equivalents()
    meta = {**config, "method": "acdc", "steps": state["steps"], "metric_value": state["current"], **equivalents}
    return Circuit(graph, kept, meta=meta)


class _Scorer:
    """The task-mean metric for a mask, over every batch (resuming from prefix caches by default)."""

    def __init__(
        self, model: Model, task: Task, metric: str, ablation: str, batch_size: int, base_mask, reuse_prefix: bool
    ):
        self.model, self.task, self.metric, self.reuse_prefix = model, task, metric, reuse_prefix
        self.batches = []
        for batch in batches(model, task, ablation, batch_size):
            tokens = batch.tokens
            with torch.no_grad():
                clean = patched_forward(
                    model, tokens.clean_ids, tokens.attention_mask, logit_positions=tokens.positions
                )
            cache = None
            if reuse_prefix:
                cache = PrefixCache(
                    model, tokens.clean_ids, tokens.attention_mask, batch.patch, tokens.positions, base_mask
                )
            self.batches.append((batch, clean.logits, cache))
        self.evaluations = 0

    def evaluate(self, edge_mask: torch.Tensor, from_layer: int) -> float:
        self.evaluations += 1
        total = 0.0
        for batch, clean_logits, cache in self.batches:
            if cache is None:
                tokens = batch.tokens
                with torch.no_grad():
                    logits = patched_forward(
                        self.model,
                        tokens.clean_ids,
                        tokens.attention_mask,
                        edge_mask,
                        batch.patch,
                        logit_positions=tokens.positions,
                    ).logits
            else:
                logits = cache.run(edge_mask, from_layer)
            total += float(metric_values(self.metric, logits, batch.tokens, clean_logits).sum()) / batch.n_total
        return total

    def forward_equivalents(self) -> dict[str, float]:
        """Layers computed, in whole forward passes over the task (the clean runs included)."""
        naive = self.evaluations + 1
        if not self.reuse_prefix:
            return {"forward_equivalents": naive, "forward_equivalents_without_prefix_reuse": naive}
        n_layers, n_batches = self.model.graph.n_layers, len(self.batches)
        layers = sum(cache.layers_run for _, _, cache in self.batches)
        used = layers / n_layers / n_batches + 2  # + the clean runs and the prefix runs
        return {"forward_equivalents": used, "forward_equivalents_without_prefix_reuse": naive}


def _checkpoint_mask(kept: torch.Tensor, graph: Graph) -> list[list[int]]:
    rows, cols = kept.nonzero(as_tuple=True)
    return [[i, j] for i, j in zip(rows.tolist(), cols.tolist(), strict=True)]


def _save_checkpoint(path, config: dict, state: dict, kept: torch.Tensor, graph: Graph) -> None:
    payload = {"version": CHECKPOINT_VERSION, "config": config, **state, "kept": _checkpoint_mask(kept, graph)}
    atomic_write_text(path, json.dumps(payload))


def _load_checkpoint(path, config: dict, graph: Graph) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        if payload.get("version") != CHECKPOINT_VERSION:
            raise CircuitsError(f"version {payload.get('version')!r}")
        kept = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
        for i, j in payload["kept"]:
            kept[i, j] = True
        state = {"next": int(payload["next"]), "current": float(payload["current"]), "steps": int(payload["steps"])}
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise CircuitsError(f"ACDC checkpoint {path} is unreadable ({error}); delete it to start over") from None
    if payload["config"] != config:
        differences = [k for k in config if payload["config"].get(k) != config[k]]
        raise CircuitsError(
            f"ACDC checkpoint {path} belongs to another run (differs in {', '.join(differences)}); "
            "use another path or delete it"
        )
    return {**state, "kept": kept & graph.real}
