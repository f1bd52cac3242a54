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

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..batching import BatchPlan, BatchSize, PlannedCheckpoint, check_batch_size, is_out_of_memory
from ..choices import ABLATIONS, METRICS, Ablation, MetricName, check_choice
from ..circuit import Circuit, edge_mask_from
from ..engine import PrefixCache, patched_forward
from ..errors import CircuitsError
from ..graph import Graph
from ..model import Model
from ..resume import open_checkpoint
from ..spans import Spans
from ..task import Task, metric_values
from ..units import real_edges
from .common import EDGES, Resolution, batches, resolution_of


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
    batch_size: BatchSize = 32,
    reuse_prefix: bool = True,
    max_memory: int | str | None = None,
    positions: bool = False,
) -> Circuit:
    """Run ACDC; returns the circuit with ``meta`` (forward-pass equivalents, steps, metric).

    ``positions``: edges at a span are the units (the task's spans, ``circuits.spans``): each destination's
    incoming edges are visited span by span, last span first, and a destination at a span is dropped without
    evaluation when none of the nodes it carries to (at that span; a key or value: at every span it reaches) has
    a remaining outgoing edge there. ``candidates`` may then also be a circuit by span.

    ``candidates``: edge names, a Circuit or a boolean mask restricting the search; every other
    edge counts as removed. ``checkpoint``: a file (see ``circuits.resume``) saved atomically after
    every destination; calling again with the same path resumes where it stopped and gives the
    identical circuit. It belongs to this model (config and weights), task (content and metric),
    threshold, metric, ablation, batch size and candidate edge set: another call with the same path
    raises ``CircuitsError`` naming what differs. ``meta["forward_equivalents"]`` is the true cost of
    the whole search, the runs before an interruption included (their counters are saved with it).
    ``reuse_prefix=False`` runs every step as a whole forward (for benchmarks; same circuit).

    ``batch_size``: examples per batch, or ``"auto"``: as many as fit ``max_memory`` (bytes or a string such
    as ``"8GiB"``; default: what the device has free), see ``circuits.batching``. Every batch's prefix is
    kept for the whole search, so the batch size bounds the memory of one step, not of the caches. After an
    out-of-memory error every batch is laid out again with half as many examples (one line on stderr); the
    checkpoint records the layout in use, so a resumed search replays it.
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
        raise CircuitsError(f"threshold must be a number >= 0, got {threshold!r}")
    check_choice("metric", metric, METRICS)
    check_choice("ablation", ablation, ABLATIONS)
    check_batch_size(batch_size)
    plan = BatchPlan.of(batch_size, model.device, max_memory)
    graph = model.graph
    resolution = resolution_of(model, task, "edge", positions)
    kept = _candidates(graph, candidates, resolution.spans)
    n_candidates = int(kept.sum())
    config = {"threshold": float(threshold), "metric": metric, "ablation": ablation}
    parameters = {
        "method": "acdc",
        **config,
        "batch_size": plan.requested,
        "candidates": kept,
        "reuse_prefix": reuse_prefix,
    }
    if resolution.spans is not None:
        parameters["spans"] = resolution.spans.to_dict()
    resumable = open_checkpoint(checkpoint, model, task, parameters)
    if resumable is not None:  # it records the batches laid out, and replays them when resumed
        resumable = PlannedCheckpoint(resumable, plan)
    order = destination_order(graph)
    saved = None if resumable is None else resumable.load()
    base_mask = kept.to(model.dtype).to(model.device)
    scorer = None
    if saved is None:
        state = {"next": 0, "steps": 0, "cost": dict.fromkeys(COST_KEYS, 0.0)}
    else:
        state, kept = _resumed(saved, resumable, graph, len(order), resolution.spans)
    show = progress and distributed.is_main()
    bar = tqdm(total=len(order), initial=state["next"], desc="ACDC destinations", disable=not show)
    for position in range(state["next"], len(order)):
        if scorer is None:
            # the prefix before each layer is computed with the candidate mask, which ACDC has not touched there
            scorer = _Scorer(model, task, metric, ablation, plan, base_mask, reuse_prefix, resolution)
            if position == 0:
                state["current"] = scorer.evaluate(base_mask, graph.n_layers)
        destination = order[position]
        layer = graph.destination_layer(destination)
        for at in _visits(graph, kept, destination, resolution.spans):  # the edge (or edge at a span) index
            kept[at] = False
            value = scorer.evaluate(kept.to(model.dtype).to(model.device), layer)
            state["steps"] += 1
            if abs(value - state["current"]) <= threshold:
                state["current"] = value
            else:
                kept[at] = True
            bar.set_postfix(edges_visited=state["steps"], edges_kept=int(kept.sum()))
        state["next"] = position + 1
        if resumable is not None:
            resumable.save({**state, "cost": _total_cost(state["cost"], scorer)}, {"kept": kept})
        bar.update(1)
    bar.close()
    cost = _total_cost(state["cost"], scorer)
    meta = {
        "model": model.name,
        "task": task.name,
        "n": len(task),
        **config,
        "candidates": n_candidates,
        "method": "acdc",
        "steps": state["steps"],
        "metric_value": state["current"],
        **cost,
    }
    return Circuit(graph, kept, meta=meta, spans=resolution.spans)


def _candidates(graph: Graph, candidates: Any, spans: Spans | None) -> torch.Tensor:
    """The edges the search starts from: every edge, or ``candidates`` (by span: at every span, unless they are
    a circuit by the same spans)."""
    if isinstance(candidates, Circuit) and candidates.spans is not None:
        if spans is None or candidates.spans.names != spans.names:
            raise CircuitsError("candidates by span need positions=True and the task's spans")
        return candidates.mask.clone()
    kept = graph.real.clone() if candidates is None else edge_mask_from(graph, candidates)
    return kept if spans is None else kept[:, :, None].repeat(1, 1, len(spans))


def _visits(graph: Graph, kept: torch.Tensor, destination: int, spans: Spans | None):
    """The kept edges into ``destination`` to try removing, in order (sources last first; by span, last span
    first): after step 3 of the module docstring has removed those whose destination feeds nothing kept."""
    nodes = graph.fed_nodes(destination)
    if spans is None:
        if nodes and not kept[nodes].any():
            kept[:, destination] = False
        for source in kept[:, destination].nonzero().flatten().tolist()[::-1]:
            yield source, destination
        return
    key_value = graph.destination_nodes[destination].qkv in ("k", "v")
    for span in reversed(range(len(spans))):
        carried = spans.reaches[span] if key_value else torch.arange(len(spans)) == span
        if nodes and not kept[nodes][:, :, carried].any():
            kept[:, destination, span] = False
        for source in kept[:, destination, span].nonzero().flatten().tolist()[::-1]:
            yield source, destination, span


COST_KEYS = ("forward_equivalents", "forward_equivalents_without_prefix_reuse")


def _total_cost(before: dict[str, float], scorer: _Scorer | None) -> dict[str, float]:
    """The work of the runs before this one (from the checkpoint) plus this run's."""
    now = dict.fromkeys(COST_KEYS, 0.0) if scorer is None else scorer.forward_equivalents()
    return {key: before[key] + now[key] for key in COST_KEYS}


def _resumed(
    saved, resumable, graph: Graph, n_destinations: int, spans: Spans | None
) -> tuple[dict[str, Any], torch.Tensor]:
    """The loop state and the kept mask of a checkpoint, checked."""
    try:
        state = {
            "next": int(saved.state["next"]),
            "steps": int(saved.state["steps"]),
            "current": float(saved.state["current"]),
            "cost": {key: float(saved.state["cost"][key]) for key in COST_KEYS},
        }
        kept = saved.tensors["kept"]
        if kept.dtype != torch.bool or kept.shape != real_edges(graph, spans).shape:
            raise ValueError(f"a kept mask of {kept.dtype} {tuple(kept.shape)}")
        if not 0 < state["next"] <= n_destinations:
            raise ValueError(f"destination {state['next']} of {n_destinations}")
    except (KeyError, TypeError, ValueError) as error:
        raise CircuitsError(f"checkpoint {resumable.path} is unreadable ({error}); delete it to start over") from None
    return state, kept & real_edges(graph, spans)


class _Scorer:
    """The task-mean metric for a mask, over every batch (resuming from prefix caches by default)."""

    def __init__(
        self,
        model: Model,
        task: Task,
        metric: str,
        ablation: str,
        plan: BatchPlan,
        base_mask,
        reuse_prefix: bool,
        resolution: Resolution = EDGES,
    ):
        self.model, self.task, self.metric, self.reuse_prefix = model, task, metric, reuse_prefix
        self.resolution = resolution
        self.ablation, self.plan, self.base_mask = ablation, plan, base_mask
        self.batches = []  # (batch, clean logits, prefix cache) of this rank's batches
        self.n_batches, self.built = 0, False
        self.evaluations = 0
        self.dropped = 0.0  # forward equivalents run on batch layouts dropped after running out of memory

    def _build(self) -> None:
        """This rank's batches' clean logits and (with ``reuse_prefix``) prefix caches, laid out by the plan
        (every batch, or under torch.distributed every world-size-th)."""
        for batch in batches(self.model, self.task, self.ablation, self.plan, owned=distributed.owns):
            tokens = batch.tokens
            with torch.no_grad():
                clean = patched_forward(
                    self.model, tokens.clean_ids, tokens.attention_mask, logit_positions=tokens.positions
                )
            cache = None
            if self.reuse_prefix:
                cache = PrefixCache(
                    self.model,
                    tokens.clean_ids,
                    tokens.attention_mask,
                    batch.patch,
                    tokens.positions,
                    self.base_mask,
                    self.resolution.batch_spans(tokens),
                )
            self.batches.append((batch, clean.logits, cache))
        self.n_batches, self.built = len(self.plan.sizes), True

    def _retrying(self, compute):
        """``compute()``; after an out-of-memory error (on any rank) the batches are dropped, laid out again with
        half as many examples and rebuilt (one line on stderr), and ``compute`` runs again."""
        while True:
            try:
                return compute()
            except Exception as error:  # only allocation failures are retried
                if not is_out_of_memory(error):
                    raise
            if self.reuse_prefix and self.batches:
                layers = sum(cache.layers_run for _, _, cache in self.batches)
                self.dropped += layers / self.model.graph.n_layers / len(self.batches)
            self.batches, self.built = [], False
            self.plan.halve(everything=True)

    def evaluate(self, edge_mask: torch.Tensor, from_layer: int) -> float:
        """The task-mean metric: each batch's share, summed in batch order (on one rank or many alike)."""
        self.evaluations += 1
        values = self._retrying(
            lambda: distributed.sum_owned(lambda: self._batch_values(edge_mask, from_layer), "an ACDC step")
        )
        total = 0.0
        for value in values.tolist():
            total += value
        return total

    def _batch_values(self, edge_mask: torch.Tensor, from_layer: int) -> torch.Tensor:
        """Each of this rank's batches' share of the task-mean metric, float64 ``[batches]``, zeros elsewhere."""
        if not self.built:
            self._build()
        values = torch.zeros(self.n_batches, dtype=torch.float64)
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
                        spans=self.resolution.batch_spans(tokens),
                    ).logits
            else:
                logits = cache.run(edge_mask, from_layer)
            values[batch.index] = (
                float(metric_values(self.metric, logits, batch.tokens, clean_logits).sum()) / batch.n_total
            )
        return values

    def forward_equivalents(self) -> dict[str, float]:
        """Layers computed, in whole forward passes over the task (the clean runs included)."""
        naive = self.evaluations + 1
        if not self.reuse_prefix:
            return {"forward_equivalents": naive, "forward_equivalents_without_prefix_reuse": naive}
        n_layers, n_batches = self.model.graph.n_layers, max(len(self.batches), 1)
        layers = sum(cache.layers_run for _, _, cache in self.batches)
        used = self.dropped + layers / n_layers / n_batches + 2  # + the clean runs and the prefix runs
        return {"forward_equivalents": used, "forward_equivalents_without_prefix_reuse": naive}
