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
from typing import Literal

import torch

from .errors import CircuitsError

NodeKind = Literal["input", "attn", "mlp", "logits"]


@dataclass(frozen=True)
class Node:
    """What a node or destination name stands for: the one place names are interpreted.

    ``layer`` is -1 for ``input`` and ``n_layers`` for ``logits``; ``head`` is the query head of a
    head and its ``<q>``, the key/value head of a ``<k>``/``<v>``, None otherwise; ``qkv`` is
    ``"q"``, ``"k"`` or ``"v"`` for attention inputs, None otherwise.
    """

    name: str
    kind: NodeKind
    layer: int
    head: int | None = None
    qkv: str | None = None


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

        sources: list[Node] = [Node("input", "input", -1)]
        destinations: list[Node] = []
        reads, layers = [], []
        for layer in range(n_layers):
            head_start, dst_start = len(sources), len(destinations)
            sources += [Node(f"a{layer}.h{h}", "attn", layer, h) for h in range(n_heads)]
            destinations += [Node(f"a{layer}.h{h}<q>", "attn", layer, h, "q") for h in range(n_heads)]
            destinations += [Node(f"a{layer}.h{g}<k>", "attn", layer, g, "k") for g in range(n_kv_heads)]
            destinations += [Node(f"a{layer}.h{g}<v>", "attn", layer, g, "v") for g in range(n_kv_heads)]
            attention_reads = head_start
            mlp_reads = head_start if parallel else head_start + n_heads
            reads += [attention_reads] * (n_heads + 2 * n_kv_heads)
            destinations.append(Node(f"m{layer}", "mlp", layer))
            reads.append(mlp_reads)
            sources.append(Node(f"m{layer}", "mlp", layer))
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
        destinations.append(Node("logits", "logits", n_layers))
        reads.append(len(sources))

        self.source_nodes, self.destination_nodes = sources, destinations
        self.sources: list[str] = [node.name for node in sources]
        self.destinations: list[str] = [node.name for node in destinations]
        self.layers: list[LayerSlots] = layers
        self.n_inputs = torch.tensor(reads)  # per destination: how many sources it reads
        self._source_index = {name: i for i, name in enumerate(self.sources)}
        self._destination_index = {name: j for j, name in enumerate(self.destinations)}
        self._nodes = {node.name: node for node in (*destinations, *sources)}

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
        return torch.tensor([node.layer for node in self.destination_nodes])

    def node(self, name: str) -> Node:
        """The facts of a source node or destination name (``"a3.h1"``, ``"a3.h0<k>"``, ``"m2"``, ``"logits"``)."""
        try:
            return self._nodes[name]
        except KeyError:
            raise CircuitsError(
                f"unknown node {name!r}; nodes look like 'input', 'a0.h3', 'a1.h0<q>', 'm2', 'logits'"
            ) from None

    def destination_layer(self, destination: int) -> int:
        """The layer whose computation reads ``destination`` (``n_layers`` for the logits)."""
        return self.destination_nodes[destination].layer

    def first_reader_layer(self, source: int) -> int:
        """The earliest layer in which some destination reads ``source``."""
        return self.destination_layer(int(self.real[source].nonzero()[0]))

    def fed_nodes(self, destination: int) -> list[int]:
        """The source indices of the nodes a destination feeds: its head or MLP, every query head of
        its group for a key/value input, none for the logits."""
        return self.feeds[destination].nonzero().flatten().tolist()

    def nodes_of(self, mask: torch.Tensor) -> list[str]:
        """Source nodes with an edge in ``mask`` (boolean ``[n_src, n_dst]``), then ``logits`` if it is reached."""
        sources = [self.sources[i] for i in mask.any(1).nonzero().flatten().tolist()]
        return sources + (["logits"] if mask[:, -1].any() else [])

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def ungrouped_names(self, destination: int) -> list[str]:
        """A destination's names in MIB's ungrouped layout: a key/value input of a grouped-query model once
        per query head of its group (``a2.h0<k>`` -> ``a2.h0<k>``, ``a2.h1<k>``, ...); others their own name."""
        node = self.destination_nodes[destination]
        if node.qkv not in ("k", "v") or self.group_size == 1:
            return [node.name]
        heads = range(node.head * self.group_size, (node.head + 1) * self.group_size)
        return [f"a{node.layer}.h{head}<{node.qkv}>" for head in heads]

    @cached_property
    def _ungrouped_index(self) -> dict[str, int]:
        return {name: j for j in range(self.n_dst) for name in self.ungrouped_names(j)}

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

    def index(self, edge: str, ungrouped: bool = False) -> tuple[int, int]:
        """``(source_index, destination_index)`` of an edge name such as ``a0.h1->m3``.

        ``ungrouped=True`` reads key/value inputs by MIB's per-query-head names of a grouped-query model
        (``a2.h5<k>``: the key/value head that query head 5 reads), as ``ungrouped_names`` writes them.
        """
        src, sep, dst = edge.partition("->")
        if not sep:
            raise CircuitsError(f"edge {edge!r} is not of the form 'source->destination'")
        i = self.source_index(src)
        if ungrouped and dst in self._ungrouped_index:
            j = self._ungrouped_index[dst]
        else:
            j = self.destination_index(dst)
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
