"""Scores and circuits: views over dense ``[n_src, n_dst]`` tensors aligned with a model's graph."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import export
from .choices import LEVELS, Level
from .errors import CircuitsError
from .graph import Graph
from .task import HIGHER_IS_BETTER

if TYPE_CHECKING:
    import networkx as nx
    import pandas as pd


class Scores:
    """One score per edge (``level="edge"``, ``[n_src, n_dst]``, NaN where no edge) or per source node.

    A score estimates mean metric(with the edge or node ablated) minus mean metric(clean).
    """

    def __init__(self, graph: Graph, tensor: torch.Tensor, level: Level = "edge", meta: dict[str, Any] | None = None):
        expected = (graph.n_src, graph.n_dst) if level == "edge" else (graph.n_src,)
        if level not in LEVELS or tuple(tensor.shape) != expected:
            raise CircuitsError(f"{level} scores need shape {list(expected)}, got {tuple(tensor.shape)}")
        self.graph, self.level, self.meta = graph, level, dict(meta or {})
        self.tensor = tensor.detach().float().cpu()
        if level == "edge":
            self.tensor = self.tensor.masked_fill(~graph.real, float("nan"))

    def __getitem__(self, name: str) -> float:
        """The score of an edge (``"a0.h1->m2"``) or, at node level, of a source node (``"a0.h1"``)."""
        if self.level == "node":
            return float(self.tensor[self.graph.source_index(name)])
        return float(self.tensor[self.graph.index(name)])

    def __len__(self) -> int:
        return len(self.graph) if self.level == "edge" else self.graph.n_src

    def values(self) -> torch.Tensor:
        """The scores of real edges (or of all nodes), in ``graph.edges`` order."""
        return self.tensor[self.graph.real] if self.level == "edge" else self.tensor

    def to_frame(self) -> pd.DataFrame:
        """One row per edge: edge, src, dst, qkv, score (node level: node, score)."""
        if self.level == "node":
            import pandas as pd

            return pd.DataFrame({"node": self.graph.sources, "score": self.tensor.tolist()})
        return export.edge_frame(self.graph, self.graph.real, self.tensor)

    def top_edges(self, n: int, absolute: bool = True) -> list[str]:
        """The names of the ``n`` best-scoring edges (by |score| unless ``absolute=False``)."""
        if self.level != "edge":
            raise CircuitsError("top_edges needs edge-level scores")
        return [self.graph.edges[i] for i in ranking(self, absolute)[:n].tolist()]

    def top_n(self, n: int, absolute: bool = True) -> Circuit:
        """The ``n`` best edges (by |score| unless ``absolute=False``), then pruned."""
        return select(self._edge_level(), top_n_mask(self, n, absolute), f"top_n({n}, absolute={absolute})")

    def most_helpful(self, n: int, higher_is_better: bool | None = None) -> Circuit:
        """The ``n`` edges whose ablation hurts the task most, then pruned; the circuit keeps the scores.

        This is the ordering of MIB's CPR and usually gives more faithful circuits than |score|, which
        also picks edges that work against the answer. Which sign hurts follows ``helpful_sign`` of the
        task's metric, recorded in ``meta`` by ``attribute``; ``higher_is_better`` overrides it (for
        scores made elsewhere).
        """
        if higher_is_better is None:
            higher_is_better = self.meta.get("higher_is_better", HIGHER_IS_BETTER.get(self.meta.get("metric")))
        sign = helpful_sign(higher_is_better, self.meta.get("metric"))
        oriented = Scores(self.graph, self.tensor * sign, self.level, self.meta)
        return select(self._edge_level(), top_n_mask(oriented, n, absolute=False), f"most_helpful({n})")

    def threshold(self, t: float, absolute: bool = True) -> Circuit:
        """Every edge whose score (|score| unless ``absolute=False``) is at least ``t``, then pruned."""
        values = self._edge_level().tensor.nan_to_num(float("-inf"))
        mask = (values.abs() if absolute else values) >= t
        return select(self, mask, f"threshold({t}, absolute={absolute})")

    def greedy(self, n: int, absolute: bool = True) -> Circuit:
        """Grow from ``logits`` backwards, always adding the best edge into the circuit so far (EAP-IG's
        greedy selection), until ``n`` edges; then pruned."""
        return select(self._edge_level(), greedy_mask(self, n, absolute), f"greedy({n}, absolute={absolute})")

    def _edge_level(self) -> Scores:
        if self.level != "edge":
            raise CircuitsError("selecting a circuit needs edge-level scores")
        return self

    def __repr__(self) -> str:
        method = self.meta.get("method", "?")
        return f"Scores({method}, {self.level} level, {len(self):,} scores)"


class Circuit:
    """A set of edges of a model's graph (a boolean ``[n_src, n_dst]`` mask), with optional scores."""

    def __init__(self, graph: Graph, mask: torch.Tensor, scores: torch.Tensor | None = None, meta: dict | None = None):
        if tuple(mask.shape) != (graph.n_src, graph.n_dst):
            raise CircuitsError(f"circuit mask needs shape {[graph.n_src, graph.n_dst]}, got {tuple(mask.shape)}")
        self.graph, self.meta = graph, dict(meta or {})
        self.mask = mask.bool().cpu() & graph.real
        self.scores = None if scores is None else scores.detach().float().cpu()

    @classmethod
    def from_edges(cls, graph: Graph, edges: Iterable[str], **kwargs) -> Circuit:
        return cls(graph, edge_mask_from(graph, edges), **kwargs)

    @property
    def edges(self) -> list[str]:
        rows, cols = self.mask.nonzero(as_tuple=True)
        sources, destinations = self.graph.sources, self.graph.destinations
        return [f"{sources[i]}->{destinations[j]}" for i, j in zip(rows.tolist(), cols.tolist(), strict=True)]

    @property
    def nodes(self) -> list[str]:
        """Source nodes with an edge in the circuit, then ``logits`` if it is reached."""
        return self.graph.nodes_of(self.mask)

    def edge_mask(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The circuit as an engine edge mask: 1 on its edges, 0 elsewhere."""
        return self.mask.to(dtype=dtype, device=device)

    def __len__(self) -> int:
        return int(self.mask.sum())

    # --- files and views (circuits/export.py) ----------------------------------------------
    def save(self, path: str | Path, full: bool = True) -> Path:
        """Write the EAP-IG/MIB JSON layout (every edge with score and in_graph, plus ``meta``), atomically;
        ``full=False`` lists only the circuit's own edges and nodes (``Circuit.load`` reads both)."""
        return export.save(self, path, full=full)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> Circuit:
        """Read a circuit JSON file (ours, EAP-IG's or MIB's); with ``model``, checked against its graph."""
        graph, mask, scores, meta = export.load(path, None if model is None else model.graph)
        return cls(graph, mask, scores=scores, meta=meta)

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
        """One row per circuit edge: edge, src, dst, qkv, score."""
        return export.edge_frame(self.graph, self.mask, self.scores)

    def plot(self, path_or_ax=None, **kwargs):
        """A layered figure of the circuit (see ``circuits.plot.plot_circuit``); file type from the extension."""
        from .plot import plot_circuit

        return plot_circuit(self, path_or_ax, **kwargs)

    def __repr__(self) -> str:
        return f"Circuit({len(self)} edges, {len(self.nodes)} nodes)"


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


def prune(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """Drop edges whose source is unreachable from ``input`` or whose destination cannot reach ``logits``.

    A node is reached when one of its inputs has a kept edge from a reached node (``input`` is
    reached); a destination is useful when it is ``logits`` or feeds a node with a kept edge into a
    useful destination. Repeated until nothing changes.
    """
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


def select(scores: Scores, mask: torch.Tensor, how: str) -> Circuit:
    """A pruned circuit from a selected edge mask, with edges and nodes before and after pruning in ``meta``."""
    graph = scores.graph
    before = Circuit(graph, mask)
    after = Circuit(graph, prune(graph, mask), scores=scores.tensor, meta=dict(scores.meta))
    after.meta["selection"] = {
        "how": how,
        "edges_before_pruning": len(before),
        "nodes_before_pruning": len(before.nodes),
        "edges_after_pruning": len(after),
        "nodes_after_pruning": len(after.nodes),
    }
    return after


def ranking(scores: Scores, absolute: bool = True) -> torch.Tensor:
    """Positions in ``graph.edges`` order, best first (by |score| unless ``absolute=False``; ties keep order)."""
    values = scores.values()
    return torch.argsort(values.abs() if absolute else values, descending=True, stable=True)


def top_n_mask(scores: Scores, n: int, absolute: bool = True) -> torch.Tensor:
    if not isinstance(n, int) or n < 0:
        raise CircuitsError(f"n must be a non-negative number of edges, got {n!r}")
    graph = scores.graph
    order = ranking(scores, absolute)[:n]
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    rows, cols = graph.real.nonzero(as_tuple=True)
    mask[rows[order], cols[order]] = True
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
