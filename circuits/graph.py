"""The computational graph of a transformer: sources, destinations, edges.

Sources write to the residual stream (``input``, each head ``aL.hH``, each MLP
``mL``); destinations read it (each head's ``<q>``, each key/value head's
``<k>`` and ``<v>``, each MLP input ``mL``, and ``logits``). Every destination
reads a *prefix* of the sources in forward order, so the real-edge mask is
``source_index < n_inputs[destination]`` and the engine can contract over
prefixes. This module depends on nothing else in the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import CircuitsError


@dataclass(frozen=True)
class LayerSlots:
    """Where one layer's nodes sit in the source and destination index spaces."""

    layer: int
    heads: slice  # source indices of aL.h0 ... aL.h{H-1}
    mlp_source: int  # source index of mL
    attention_destinations: slice  # q heads, then k groups, then v groups
    mlp_destination: int
    attention_reads: int  # how many sources the attention destinations read
    mlp_reads: int  # how many sources the MLP reads


class Graph:
    """Node and edge names of a transformer, with a dense ``[n_src, n_dst]`` index.

    ``parallel=True`` is for blocks whose attention and MLP read the same
    residual stream (GPT-NeoX/Pythia): a layer's heads then have no edges into
    its own MLP.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel: bool = False):
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise CircuitsError(
                f"invalid graph shape: {n_layers} layers, {n_heads} heads, {n_kv_heads} key/value heads "
                "(need positive counts and heads divisible by key/value heads)"
            )
        self.n_layers, self.n_heads, self.n_kv_heads, self.parallel = n_layers, n_heads, n_kv_heads, parallel

        sources, destinations, reads, layers = ["input"], [], [], []
        for layer in range(n_layers):
            head_start, dst_start = len(sources), len(destinations)
            sources += [f"a{layer}.h{h}" for h in range(n_heads)]
            destinations += [f"a{layer}.h{h}<q>" for h in range(n_heads)]
            destinations += [f"a{layer}.h{g}<k>" for g in range(n_kv_heads)]
            destinations += [f"a{layer}.h{g}<v>" for g in range(n_kv_heads)]
            attention_reads = head_start
            mlp_reads = head_start if parallel else head_start + n_heads
            reads += [attention_reads] * (n_heads + 2 * n_kv_heads)
            destinations.append(f"m{layer}")
            reads.append(mlp_reads)
            sources.append(f"m{layer}")
            layers.append(
                LayerSlots(
                    layer=layer,
                    heads=slice(head_start, head_start + n_heads),
                    mlp_source=len(sources) - 1,
                    attention_destinations=slice(dst_start, dst_start + n_heads + 2 * n_kv_heads),
                    mlp_destination=len(destinations) - 1,
                    attention_reads=attention_reads,
                    mlp_reads=mlp_reads,
                )
            )
        destinations.append("logits")
        reads.append(len(sources))

        self.sources: list[str] = sources
        self.destinations: list[str] = destinations
        self.layers: list[LayerSlots] = layers
        self.n_inputs = torch.tensor(reads)  # per destination: how many sources it reads
        self._source_index = {name: i for i, name in enumerate(sources)}
        self._destination_index = {name: j for j, name in enumerate(destinations)}

    @property
    def n_src(self) -> int:
        return len(self.sources)

    @property
    def n_dst(self) -> int:
        return len(self.destinations)

    @cached_property
    def real(self) -> torch.Tensor:
        """Boolean ``[n_src, n_dst]``: True where the edge exists."""
        return torch.arange(self.n_src)[:, None] < self.n_inputs[None, :]

    @cached_property
    def edges(self) -> list[str]:
        """Edge names ``src->dst``, ordered by source then destination."""
        rows, cols = self.real.nonzero(as_tuple=True)
        return [f"{self.sources[i]}->{self.destinations[j]}" for i, j in zip(rows.tolist(), cols.tolist(), strict=True)]

    @cached_property
    def destination_layers(self) -> torch.Tensor:
        """Per destination, the layer that reads it (``n_layers`` for ``logits``)."""
        layers = torch.full((self.n_dst,), self.n_layers, dtype=torch.long)
        for slots in self.layers:
            layers[slots.attention_destinations.start : slots.mlp_destination + 1] = slots.layer
        return layers

    @cached_property
    def feeds(self) -> torch.Tensor:
        """Boolean ``[n_dst, n_src]``: destination j is an input of source node s.

        A head's ``<q>`` feeds that head; a key/value head's ``<k>``/``<v>`` feed every query
        head of its group; an MLP input feeds that MLP; ``logits`` feeds no source.
        """
        feeds = torch.zeros(self.n_dst, self.n_src, dtype=torch.bool)
        group = self.n_heads // self.n_kv_heads
        for slots in self.layers:
            first = slots.attention_destinations.start
            for h in range(self.n_heads):
                head = slots.heads.start + h
                feeds[first + h, head] = True
                feeds[first + self.n_heads + h // group, head] = True
                feeds[first + self.n_heads + self.n_kv_heads + h // group, head] = True
            feeds[slots.mlp_destination, slots.mlp_source] = True
        return feeds

    def source_index(self, name: str) -> int:
        try:
            return self._source_index[name]
        except KeyError:
            raise CircuitsError(f"unknown source node {name!r}; sources look like 'input', 'a0.h3', 'm2'") from None

    def destination_index(self, name: str) -> int:
        try:
            return self._destination_index[name]
        except KeyError:
            raise CircuitsError(
                f"unknown destination node {name!r}; destinations look like 'a1.h0<q>', 'a1.h0<k>', 'm2', 'logits'"
            ) from None

    def index(self, edge: str) -> tuple[int, int]:
        """``(source_index, destination_index)`` of an edge name such as ``a0.h1->m3``."""
        src, sep, dst = edge.partition("->")
        if not sep:
            raise CircuitsError(f"edge {edge!r} is not of the form 'source->destination'")
        i, j = self.source_index(src), self.destination_index(dst)
        if not self.real[i, j]:
            raise CircuitsError(
                f"edge {edge!r} does not exist: {src} is computed after {dst} reads the residual stream"
            )
        return i, j

    def edge_name(self, i: int, j: int) -> str:
        """The name of the edge at ``[i, j]``; ValueError if that is no real edge."""
        if not (0 <= i < self.n_src and 0 <= j < self.n_dst) or not self.real[i, j]:
            raise CircuitsError(
                f"[{i}, {j}] is not an edge of this graph ({self.n_src} sources, {self.n_dst} destinations)"
            )
        return f"{self.sources[i]}->{self.destinations[j]}"

    def __len__(self) -> int:
        return int(self.n_inputs.sum())

    def __repr__(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return (
            f"Graph({self.n_layers} layers, {self.n_heads} heads, {self.n_kv_heads} kv heads, {kind}: "
            f"{self.n_src} sources, {self.n_dst} destinations, {len(self):,} edges)"
        )
