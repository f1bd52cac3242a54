"""The units a circuit is made of, at every level: their tensor shapes and their names.

Edges ``src->dst`` (``[n_src, n_dst]``), edges at a span ``src->dst@span`` (``[n_src, n_dst, S]``), source nodes
``a0.h1`` (``[n_src]``), a source's output dimension ``a0.h1.d17`` (``[n_src, d_model]``, level ``neuron``) and
an MLP's hidden unit ``m3.n120`` (``[n_layers, d_mlp]``, level ``mlp-neuron``).
"""

from __future__ import annotations

import torch

from .choices import LEVELS
from .errors import CircuitsError
from .graph import Graph
from .spans import Spans


def check_shape(graph: Graph, tensor: torch.Tensor, level: str, spans: Spans | None, what: str) -> None:
    """A CircuitsError unless ``tensor`` has the shape of ``level``'s units (and ``spans``) on ``graph``: edges
    ``[n_src, n_dst]`` (``[n_src, n_dst, S]`` by span), nodes ``[n_src]``, the sources' output dimensions
    ``[n_src, d_model]``, the MLPs' hidden units ``[n_layers, d_mlp]``."""
    if level not in LEVELS:
        raise CircuitsError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if spans is not None and level != "edge":
        raise CircuitsError(f"spans resolve edges; {level}-level {what} take none")
    shape = tuple(tensor.shape)
    if level == "edge":
        expected = [graph.n_src, graph.n_dst] + ([] if spans is None else [len(spans)])
        ok = shape == tuple(expected)
    elif level == "node":
        expected, ok = [graph.n_src], shape == (graph.n_src,)
    else:
        rows = graph.n_src if level == "neuron" else graph.n_layers
        expected = [rows, "d_model" if level == "neuron" else "d_mlp"]
        ok = len(shape) == 2 and shape[0] == rows and shape[1] > 0
    if not ok:
        raise CircuitsError(f"{level}-level {what} need shape {expected}, got {shape}")


def unit_names(graph: Graph, level: str, spans: Spans | None, indices: torch.Tensor) -> list[str]:
    """The names of units given by their indices ``[k, dims]`` into a tensor of ``level``: ``a0.h1->m2``,
    ``a0.h1->m2@S2`` by span, ``a0.h1`` a node, ``a0.h1.d17`` an output dimension, ``m3.n120`` a hidden unit."""
    rows = indices.tolist()
    if level == "edge":
        names = [f"{graph.sources[row[0]]}->{graph.destinations[row[1]]}" for row in rows]
        if spans is not None:
            names = [f"{name}@{spans.names[row[2]]}" for name, row in zip(names, rows, strict=True)]
        return names
    if level == "node":
        return [graph.sources[row[0]] for row in rows]
    if level == "neuron":
        return [f"{graph.sources[u]}.d{d}" for u, d in rows]
    return [f"m{layer}.n{unit}" for layer, unit in rows]


def unit_index(graph: Graph, level: str, spans: Spans | None, name: str) -> tuple[int, ...]:
    """The index into a tensor of ``level`` of the unit ``name`` (see ``unit_names``)."""
    if level == "edge":
        edge, _, span = name.partition("@")
        if (spans is None) != (not span):
            form = "'src->dst'" if spans is None else "'src->dst@span'"
            raise CircuitsError(f"{name!r}: these scores name edges as {form}")
        return (*graph.index(edge), *(() if spans is None else (spans.index(span),)))
    if level == "node":
        return (graph.source_index(name),)
    node, _, unit = name.rpartition(".")
    letter = "d" if level == "neuron" else "n"
    if not unit[:1] == letter or not unit[1:].isdigit():
        example = "'a0.h1.d17'" if level == "neuron" else "'m3.n120'"
        raise CircuitsError(f"{name!r} is no {level} name; they look like {example}")
    if level == "neuron":
        return graph.source_index(node), int(unit[1:])
    if not (node[:1] == "m" and node[1:].isdigit() and int(node[1:]) < graph.n_layers):
        raise CircuitsError(f"{name!r}: no MLP {node!r} in this graph ({graph.n_layers} layers)")
    return int(node[1:]), int(unit[1:])


def real_edges(graph: Graph, spans: Spans | None = None) -> torch.Tensor:
    """Boolean, True where an edge exists: ``[n_src, n_dst]``, or by span ``[n_src, n_dst, S]`` (each edge at
    every span; an expanded view, not a copy)."""
    return graph.real if spans is None else graph.real[:, :, None].expand(-1, -1, len(spans))
