"""Scores and circuits: views over dense ``[n_src, n_dst]`` tensors aligned with a model's graph."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import export
from .choices import Level
from .errors import CircuitsError
from .graph import Graph
from .spans import Spans
from .task import HIGHER_IS_BETTER
from .units import check_shape, real_edges, unit_index, unit_names

if TYPE_CHECKING:
    import networkx as nx
    import pandas as pd


class Scores:
    """Scores of one level's units, a dense tensor aligned with a model's graph: one per edge (``level="edge"``,
    ``[n_src, n_dst]``, NaN where no edge; ``[n_src, n_dst, S]`` resolved by the task's ``spans``), per source
    node (``[n_src]``), per output dimension of each source (``"neuron"``, ``[n_src, d_model]``) or per MLP
    hidden unit (``"mlp-neuron"``, ``[n_layers, d_mlp]``).

    A score estimates mean metric(with the unit ablated) minus mean metric(clean).
    """

    def __init__(
        self,
        graph: Graph,
        tensor: torch.Tensor,
        level: Level = "edge",
        meta: dict[str, Any] | None = None,
        spans: Spans | None = None,
    ):
        check_shape(graph, tensor, level, spans, "scores")
        self.graph, self.level, self.meta, self.spans = graph, level, dict(meta or {}), spans
        self.tensor = tensor.detach().float().cpu()
        if level == "edge":
            self.tensor = self.tensor.masked_fill(~self.real, float("nan"))

    @property
    def real(self) -> torch.Tensor:
        """Boolean, the tensor's shape: True where a unit exists (every edge of the graph; every neuron)."""
        if self.level != "edge":
            return torch.ones(self.tensor.shape, dtype=torch.bool)
        return real_edges(self.graph, self.spans)

    def __getitem__(self, name: str) -> float:
        """The score of a unit: an edge ``"a0.h1->m2"`` (``"a0.h1->m2@S2"`` by span), a node ``"a0.h1"``, an
        output dimension ``"a0.h1.d17"``, a hidden unit ``"m3.n120"``."""
        index = unit_index(self.graph, self.level, self.spans, name)
        if any(k >= size for k, size in zip(index, self.tensor.shape, strict=True)):
            shape = list(self.tensor.shape)
            raise CircuitsError(f"{name!r} is out of range: these {self.level} scores have shape {shape}")
        return float(self.tensor[index])

    def __len__(self) -> int:
        return int(self.real.sum())

    def values(self) -> torch.Tensor:
        """The scores of every unit, in ``names()`` order (edges by source, destination, then span)."""
        return self.tensor[self.real]

    def names(self) -> list[str]:
        """Every unit's name, in ``values()`` order."""
        return unit_names(self.graph, self.level, self.spans, self.real.nonzero())

    def to_frame(self) -> pd.DataFrame:
        """One row per unit: edges with edge, src, dst, qkv (and span), score; nodes: node, score; neurons:
        node, unit, score (sorted as ``names()``)."""
        import pandas as pd

        if self.level == "edge":
            return export.edge_frame(self.graph, self.real, self.tensor, self.spans)
        if self.level == "node":
            return pd.DataFrame({"node": self.graph.sources, "score": self.tensor.tolist()})
        return export.neuron_frame(self.graph, self.level, self.real, self.tensor)

    def top_edges(self, n: int, absolute: bool = True) -> list[str]:
        """The names of the ``n`` best-scoring units (by |score| unless ``absolute=False``)."""
        if self.level == "node":
            raise CircuitsError("top_edges needs edge- or neuron-level scores")
        order = ranking(self, absolute)[:n]
        return unit_names(self.graph, self.level, self.spans, self.real.nonzero()[order])

    def top_n(self, n: int, absolute: bool = True) -> Circuit:
        """The ``n`` best units (by |score| unless ``absolute=False``), then pruned (edges)."""
        return select(self._selectable(), top_n_mask(self, n, absolute), f"top_n({n}, absolute={absolute})")

    def most_helpful(self, n: int, higher_is_better: bool | None = None) -> Circuit:
        """The ``n`` units whose ablation hurts the task most, then pruned (edges); the circuit keeps the scores.

        This is the ordering of MIB's CPR and usually gives more faithful circuits than |score|, which
        also picks edges that work against the answer. Which sign hurts follows ``helpful_sign`` of the
        task's metric, recorded in ``meta`` by ``attribute``; ``higher_is_better`` overrides it (for
        scores made elsewhere).
        """
        if higher_is_better is None:
            higher_is_better = self.meta.get("higher_is_better", HIGHER_IS_BETTER.get(self.meta.get("metric")))
        sign = helpful_sign(higher_is_better, self.meta.get("metric"))
        oriented = Scores(self.graph, self.tensor * sign, self.level, self.meta, self.spans)
        return select(self._selectable(), top_n_mask(oriented, n, absolute=False), f"most_helpful({n})")

    def threshold(self, t: float, absolute: bool = True) -> Circuit:
        """Every unit whose score (|score| unless ``absolute=False``) is at least ``t``, then pruned (edges)."""
        values = self._selectable().tensor.nan_to_num(float("-inf"))
        mask = (values.abs() if absolute else values) >= t
        return select(self, mask, f"threshold({t}, absolute={absolute})")

    def greedy(self, n: int, absolute: bool = True) -> Circuit:
        """Grow from ``logits`` backwards, always adding the best edge into the circuit so far (EAP-IG's
        greedy selection), until ``n`` edges; then pruned."""
        if self.level != "edge" or self.spans is not None:
            raise CircuitsError("greedy selection grows whole edges: it needs edge-level scores not resolved by span")
        return select(self, greedy_mask(self, n, absolute), f"greedy({n}, absolute={absolute})")

    def _selectable(self) -> Scores:
        if self.level == "node":
            raise CircuitsError("selecting a circuit needs edge- or neuron-level scores")
        return self

    def __repr__(self) -> str:
        method = self.meta.get("method", "?")
        spans = "" if self.spans is None else f" by {len(self.spans)} spans"
        return f"Scores({method}, {self.level} level{spans}, {len(self):,} scores)"


class Circuit:
    """A set of units of a model's graph, a boolean mask of their level's shape (see ``Scores``): edges
    ``[n_src, n_dst]`` (``[n_src, n_dst, S]`` by span), or neurons; with optional scores."""

    def __init__(
        self,
        graph: Graph,
        mask: torch.Tensor,
        scores: torch.Tensor | None = None,
        meta: dict | None = None,
        level: Level = "edge",
        spans: Spans | None = None,
    ):
        if level == "node":
            raise CircuitsError("a circuit keeps edges or neurons; node scores select none")
        check_shape(graph, mask, level, spans, "circuit masks")
        self.graph, self.meta, self.level, self.spans = graph, dict(meta or {}), level, spans
        self.mask = mask.bool().cpu()
        if level == "edge":  # a new tensor: the caller's mask is never written to
            self.mask = self.mask & real_edges(graph, spans)
        self.scores = None if scores is None else scores.detach().float().cpu()

    @classmethod
    def from_edges(cls, graph: Graph, edges: Iterable[str], **kwargs) -> Circuit:
        return cls(graph, edge_mask_from(graph, edges), **kwargs)

    @property
    def units(self) -> list[str]:
        """The names of the circuit's units (edges, edges at spans, or neurons; see ``Scores.names``)."""
        return unit_names(self.graph, self.level, self.spans, self.mask.nonzero())

    @property
    def edges(self) -> list[str]:
        """The circuit's edges (``src->dst``, ``src->dst@span`` by span)."""
        if self.level != "edge":
            raise CircuitsError(f"a {self.level}-level circuit keeps neurons, not edges: see Circuit.units")
        return self.units

    @property
    def nodes(self) -> list[str]:
        """Source nodes with a unit in the circuit (an edge out of them, or a neuron of theirs), then ``logits``
        if an edge reaches it."""
        if self.level == "edge":
            return self.graph.nodes_of(self.mask if self.spans is None else self.mask.any(2))
        kept = self.mask.any(1).nonzero().flatten().tolist()
        if self.level == "neuron":
            return [self.graph.sources[u] for u in kept]
        return [self.graph.sources[self.graph.layers[layer].mlp_source] for layer in kept]

    def edge_mask(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The circuit as an engine mask of its level: 1 on its units, 0 elsewhere."""
        return self.mask.to(dtype=dtype, device=device)

    def __len__(self) -> int:
        return int(self.mask.sum())

    # --- files and views (circuits/export.py) ----------------------------------------------
    def save(self, path: str | Path, full: bool = True) -> Path:
        """Write the EAP-IG/MIB JSON layout (every edge with score and in_graph, plus ``meta``), atomically;
        ``full=False`` lists only the circuit's own edges and nodes (``Circuit.load`` reads both). Circuits by
        span and neuron circuits write their own layout (see ``circuits.export``)."""
        return export.save(self, path, full=full)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> Circuit:
        """Read a circuit JSON file (ours, EAP-IG's or MIB's); with ``model``, checked against its graph."""
        data = export.load(path, None if model is None else model.graph)
        return cls(data.graph, data.mask, scores=data.scores, meta=data.meta, level=data.level, spans=data.spans)

    def to_mib_json(self, path: str | Path) -> Path:
        """Like ``save``, with each GQA k/v edge repeated for every query head of its group (MIB naming)."""
        return export.save(self, path, expand_gqa=True)

    def to_networkx(self) -> nx.DiGraph:
        return export.to_networkx(self)

    def to_graphml(self, path: str | Path) -> Path:
        return export.to_graphml(self, path)

    def to_dot(self) -> str:
        return export.to_dot(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per circuit unit: edge, src, dst, qkv (span), score; neurons: node, unit, score."""
        if self.level == "edge":
            return export.edge_frame(self.graph, self.mask, self.scores, self.spans)
        return export.neuron_frame(self.graph, self.level, self.mask, self.scores)

    def plot(self, path_or_ax=None, **kwargs):
        """A layered figure of the circuit (see ``circuits.plot.plot_circuit``); file type from the extension."""
        from .plot import plot_circuit

        return plot_circuit(self, path_or_ax, **kwargs)

    def __repr__(self) -> str:
        if self.level != "edge":
            return f"Circuit({len(self)} {self.level}s, {len(self.nodes)} nodes)"
        spans = "" if self.spans is None else f" by {len(self.spans)} spans"
        return f"Circuit({len(self)} edges{spans}, {len(self.nodes)} nodes)"


def helpful_sign(higher_is_better: bool | None, metric: Any = None) -> float:
    """The one rule for which sign of a score carries the task.

    A score is metric(edge ablated) - metric(clean). When higher is better (``logit_diff``,
    ``prob_diff``), ablating an edge the task needs lowers the metric: those edges score most
    negative, sign -1. When lower is better (``kl``, ``l2``: 0 on the clean run) they score most
    positive, sign +1. Times the sign, the edges carrying the task score highest.
    """
    if higher_is_better is None:
        raise CircuitsError(
            f"which edges carry the task depends on whether higher values of the metric {metric!r} are better; "
            "declare it with Task(..., metric=fn, higher_is_better=True or False)"
        )
    if not isinstance(higher_is_better, bool):
        raise CircuitsError(f"higher_is_better must be True or False, got {higher_is_better!r}")
    return -1.0 if higher_is_better else 1.0


def edge_mask_from(graph: Graph, edges: Any) -> torch.Tensor:
    """A boolean ``[n_src, n_dst]`` mask from edge names, a Circuit, or a boolean mask; names are checked."""
    if isinstance(edges, Circuit):
        return edges.mask.clone()
    if isinstance(edges, torch.Tensor):
        if tuple(edges.shape) != (graph.n_src, graph.n_dst):
            raise CircuitsError(f"an edge mask needs shape {[graph.n_src, graph.n_dst]}, got {tuple(edges.shape)}")
        return edges.bool().cpu() & graph.real
    if isinstance(edges, str):
        raise CircuitsError(f"expected a list of edge names, got the string {edges!r}")
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    for edge in edges:
        mask[graph.index(edge)] = True
    return mask


def prune(graph: Graph, mask: torch.Tensor, spans: Spans | None = None) -> torch.Tensor:
    """Drop edges whose source is unreachable from ``input`` or whose destination cannot reach ``logits``.

    A node is reached when one of its inputs has a kept edge from a reached node (``input`` is
    reached); a destination is useful when it is ``logits`` or feeds a node with a kept edge into a
    useful destination. Repeated until nothing changes. A mask by span (``[n_src, n_dst, S]``) is pruned
    node by node and span by span (``_prune_by_span``).
    """
    if spans is not None:
        return _prune_by_span(graph, mask, spans)
    mask = mask.clone() & graph.real
    feeds = graph.feeds  # [n_dst, n_src]
    logits = graph.n_dst - 1
    while True:
        reached = torch.zeros(graph.n_src, dtype=torch.bool)
        reached[0] = True
        for slots in graph.layers:  # forward: a layer's nodes read only earlier sources
            fed = (mask & reached[:, None]).any(0)  # destinations with a kept edge from a reached source
            layer_sources = list(range(slots.heads.start, slots.mlp_source + 1))
            reached[layer_sources] = (feeds[:, layer_sources] & fed[:, None]).any(0)
            # an MLP reads its own layer's heads: recompute once they are known
            fed = (mask & reached[:, None]).any(0)
            reached[slots.mlp_source] = bool(fed[slots.mlp_destination])
        useful = torch.zeros(graph.n_dst, dtype=torch.bool)
        useful[logits] = True
        for slots in reversed(graph.layers):  # backward: which nodes send a kept edge into a useful destination
            sends = (mask & useful[None, :]).any(1)  # per source
            for j in [
                slots.mlp_destination,
                *range(slots.attention_destinations.start, slots.attention_destinations.stop),
            ]:
                useful[j] = bool((feeds[j] & sends).any())
        pruned = mask & reached[:, None] & useful[None, :]
        if torch.equal(pruned, mask):
            return pruned
        mask = pruned


def _prune_by_span(graph: Graph, mask: torch.Tensor, spans: Spans) -> torch.Tensor:
    """``prune`` for a mask by span: a node at a span is reached when a kept edge from a reached node at a span
    carries to it, and a destination at a span is useful when it carries to a node there with a kept edge into a
    useful destination (``logits`` at the spans it is read at). A query or MLP input carries within its span; a
    key or value input at span a carries to its head at every span b that ``spans.reaches[a, b]`` (attention
    reads earlier positions)."""
    mask = mask & real_edges(graph, spans)
    feeds = graph.feeds  # [n_dst, n_src]
    keys_values = torch.tensor([node.qkv in ("k", "v") for node in graph.destination_nodes])
    reaches = spans.reaches  # [a, b]: a key or value at span a reaches queries at span b

    def to_nodes(at_destinations: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``[len(rows), S]`` at the destinations' spans -> the spans of the nodes they feed."""
        moved = at_destinations.clone()
        kv = keys_values[rows]
        moved[kv] = (at_destinations[kv, :, None] & reaches[None]).any(1)
        return moved

    def to_destinations(at_nodes: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``[len(rows), S]`` at the nodes' spans -> the spans of the destinations that feed them."""
        moved = at_nodes.clone()
        kv = keys_values[rows]
        moved[kv] = (at_nodes[kv, None, :] & reaches[None]).any(2)
        return moved

    while True:
        reached = torch.zeros(graph.n_src, len(spans), dtype=torch.bool)
        reached[0] = True
        for slots in graph.layers:
            rows = [*_range(slots.attention_destinations), slots.mlp_destination]
            layer_sources = list(range(slots.heads.start, slots.mlp_source + 1))
            for _ in range(2):  # an MLP reads its own layer's heads: again once they are known
                fed = to_nodes((mask[:, rows] & reached[:, None, :]).any(0), rows)  # [len(rows), S]
                reached[layer_sources] = (feeds[rows][:, layer_sources, None] & fed[:, None, :]).any(0)
        useful = torch.zeros(graph.n_dst, len(spans), dtype=torch.bool)
        useful[graph.n_dst - 1] = spans.readout
        for slots in reversed(graph.layers):
            rows = [slots.mlp_destination, *_range(slots.attention_destinations)]
            for _ in range(2):  # the MLP's first: the layer's heads feed it
                sends = (mask & useful[None]).any(1)  # [n_src, S]: a kept edge into a useful destination
                useful[rows] = to_destinations((feeds[rows, :, None] & sends[None]).any(1), rows)
        pruned = mask & reached[:, None, :] & useful[None, :, :]
        if torch.equal(pruned, mask):
            return pruned
        mask = pruned


def _range(indices: slice) -> range:
    return range(indices.start, indices.stop)


def select(scores: Scores, mask: torch.Tensor, how: str) -> Circuit:
    """A circuit from a selected mask, pruned when it holds edges, with its units and nodes before and after
    pruning in ``meta``."""
    graph, level, spans = scores.graph, scores.level, scores.spans
    before = Circuit(graph, mask, level=level, spans=spans)
    kept = prune(graph, mask, spans) if level == "edge" else before.mask
    after = Circuit(graph, kept, scores=scores.tensor, meta=dict(scores.meta), level=level, spans=spans)
    after.meta["selection"] = {
        "how": how,
        "edges_before_pruning": len(before),
        "nodes_before_pruning": len(before.nodes),
        "edges_after_pruning": len(after),
        "nodes_after_pruning": len(after.nodes),
    }
    return after


def ranking(scores: Scores, absolute: bool = True) -> torch.Tensor:
    """Positions in ``scores.names()`` order, best first (by |score| unless ``absolute=False``; ties keep order)."""
    values = scores.values()
    return torch.argsort(values.abs() if absolute else values, descending=True, stable=True)


def top_n_mask(scores: Scores, n: int, absolute: bool = True) -> torch.Tensor:
    """The ``n`` best units as a mask of the scores' shape."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CircuitsError(f"n must be a non-negative number of {scores.level}s, got {n!r}")
    order = ranking(scores, absolute)[:n]
    mask = torch.zeros(scores.tensor.shape, dtype=torch.bool)
    mask[tuple(scores.real.nonzero()[order].T)] = True
    return mask


def greedy_mask(scores: Scores, n: int, absolute: bool = True) -> torch.Tensor:
    """Grow from ``logits`` backwards, always adding the best-scoring edge into the circuit's nodes."""
    graph = scores.graph
    values = scores.tensor.nan_to_num(float("-inf") if not absolute else 0.0)
    key = values.abs() if absolute else values
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []
    pushed_destinations: set[int] = set()

    def push_into(destination: int) -> None:
        if destination in pushed_destinations:
            return
        pushed_destinations.add(destination)
        for source in graph.real[:, destination].nonzero().flatten().tolist():
            heapq.heappush(heap, (-float(key[source, destination]), source, destination))

    push_into(graph.n_dst - 1)
    in_circuit: set[int] = set()
    while heap and int(mask.sum()) < n:
        _, source, destination = heapq.heappop(heap)
        if mask[source, destination]:
            continue
        mask[source, destination] = True
        if source not in in_circuit and source != 0:
            in_circuit.add(source)
            for fed in graph.feeds[:, source].nonzero().flatten().tolist():
                push_into(fed)
    return mask
