"""Scores and circuits: views over dense ``[n_src, n_dst]`` tensors aligned with a model's graph."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd
import torch

from .graph import Graph


class Scores:
    """One score per edge (``level="edge"``, ``[n_src, n_dst]``, NaN where no edge) or per source node.

    A score estimates mean metric(with the edge or node ablated) minus mean metric(clean).
    """

    def __init__(self, graph: Graph, tensor: torch.Tensor, level: str = "edge", meta: dict[str, Any] | None = None):
        expected = (graph.n_src, graph.n_dst) if level == "edge" else (graph.n_src,)
        if level not in ("edge", "node") or tuple(tensor.shape) != expected:
            raise ValueError(f"{level} scores need shape {list(expected)}, got {tuple(tensor.shape)}")
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
            return pd.DataFrame({"node": self.graph.sources, "score": self.tensor.tolist()})
        rows, cols = self.graph.real.nonzero(as_tuple=True)
        sources = [self.graph.sources[i] for i in rows.tolist()]
        destinations = [self.graph.destinations[j] for j in cols.tolist()]
        return pd.DataFrame(
            {
                "edge": self.graph.edges,
                "src": sources,
                "dst": destinations,
                "qkv": [d[-2] if d.endswith(">") else None for d in destinations],
                "score": self.tensor[rows, cols].tolist(),
            }
        )

    def top_edges(self, n: int, absolute: bool = True) -> list[str]:
        """The names of the ``n`` best-scoring edges (by |score| unless ``absolute=False``)."""
        if self.level != "edge":
            raise ValueError("top_edges needs edge-level scores")
        values = self.values()
        order = torch.argsort(values.abs() if absolute else values, descending=True, stable=True)
        return [self.graph.edges[i] for i in order[:n].tolist()]

    def __repr__(self) -> str:
        method = self.meta.get("method", "?")
        return f"Scores({method}, {self.level} level, {len(self):,} scores)"


class Circuit:
    """A set of edges of a model's graph (a boolean ``[n_src, n_dst]`` mask), with optional scores."""

    def __init__(self, graph: Graph, mask: torch.Tensor, scores: torch.Tensor | None = None, meta: dict | None = None):
        if tuple(mask.shape) != (graph.n_src, graph.n_dst):
            raise ValueError(f"circuit mask needs shape {[graph.n_src, graph.n_dst]}, got {tuple(mask.shape)}")
        self.graph, self.meta = graph, dict(meta or {})
        self.mask = mask.bool().cpu() & graph.real
        self.scores = None if scores is None else scores.detach().float().cpu()

    @classmethod
    def from_edges(cls, graph: Graph, edges: Iterable[str], **kwargs) -> Circuit:
        return cls(graph, edge_mask_from(graph, edges), **kwargs)

    @property
    def edges(self) -> list[str]:
        rows, cols = self.mask.nonzero(as_tuple=True)
        return [
            f"{self.graph.sources[i]}->{self.graph.destinations[j]}"
            for i, j in zip(rows.tolist(), cols.tolist(), strict=True)
        ]

    @property
    def nodes(self) -> list[str]:
        """Source nodes with an edge in the circuit, then ``logits`` if it is reached."""
        sources = [self.graph.sources[i] for i in self.mask.any(1).nonzero().flatten().tolist()]
        return sources + (["logits"] if self.mask[:, -1].any() else [])

    def edge_mask(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The circuit as an engine edge mask: 1 on its edges, 0 elsewhere."""
        return self.mask.to(dtype=dtype, device=device)

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __repr__(self) -> str:
        return f"Circuit({len(self)} edges, {len(self.nodes)} nodes)"


def edge_mask_from(graph: Graph, edges: Any) -> torch.Tensor:
    """A boolean ``[n_src, n_dst]`` mask from edge names, a Circuit, or a boolean mask; names are checked."""
    if isinstance(edges, Circuit):
        return edges.mask.clone()
    if isinstance(edges, torch.Tensor):
        if tuple(edges.shape) != (graph.n_src, graph.n_dst):
            raise ValueError(f"an edge mask needs shape {[graph.n_src, graph.n_dst]}, got {tuple(edges.shape)}")
        return edges.bool().cpu() & graph.real
    if isinstance(edges, str):
        raise ValueError(f"expected a list of edge names, got the string {edges!r}")
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    for edge in edges:
        mask[graph.index(edge)] = True
    return mask
