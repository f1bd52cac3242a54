"""Circuit files and views: EAP-IG/MIB JSON, NetworkX, GraphML, DOT, pandas.

JSON layout (read and written): ``{"cfg": {...}, "nodes": {name: {"in_graph": bool}},
"edges": {name: {"score": float | null, "in_graph": bool}}, "meta": {...}}`` with every edge
of the graph listed. For grouped-query models ``to_mib_json`` repeats each ``<k>``/``<v>`` edge
for every query head of its key/value group, as MIB's ungrouped graphs name them; loading
accepts both forms.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import pandas as pd
import torch

from .errors import CircuitsError
from .graph import Graph
from .io import atomic_write_text

if TYPE_CHECKING:
    from .circuit import Circuit
    from .model import Model

FORMAT = "circuits/eap-ig-json"


def node_attributes(graph: Graph, name: str) -> dict[str, Any]:
    """``layer``, ``kind`` (input/attn/mlp/logits) and ``head`` of a node or destination name."""
    if name == "input":
        return {"layer": -1, "kind": "input", "head": None}
    if name == "logits":
        return {"layer": graph.n_layers, "kind": "logits", "head": None}
    match = re.fullmatch(r"a(\d+)\.h(\d+)(?:<([qkv])>)?", name)
    if match:
        return {"layer": int(match[1]), "kind": "attn", "head": int(match[2])}
    return {"layer": int(name[1:]), "kind": "mlp", "head": None}


def qkv_of(destination: str) -> str | None:
    return destination[-2] if destination.endswith(">") else None


def versions() -> dict[str, str]:
    found = {}
    for package in ("circuits", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def to_json_dict(circuit: Circuit, expand_gqa: bool = False) -> dict[str, Any]:
    graph = circuit.graph
    scores = circuit.scores
    cfg = {
        "n_layers": graph.n_layers,
        "n_heads": graph.n_heads,
        "n_kv_heads": graph.n_kv_heads,
        "parallel_attn_mlp": graph.parallel,
    }
    in_graph_nodes = set(circuit.nodes)
    nodes = {name: {"in_graph": name in in_graph_nodes} for name in [*graph.sources, "logits"]}
    edges = {}
    rows, cols = graph.real.nonzero(as_tuple=True)
    group = graph.n_heads // graph.n_kv_heads
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        score = None if scores is None or math.isnan(float(scores[i, j])) else float(scores[i, j])
        entry = {"score": score, "in_graph": bool(circuit.mask[i, j])}
        source, destination = graph.sources[i], graph.destinations[j]
        kind = qkv_of(destination)
        if expand_gqa and kind in ("k", "v") and group > 1:
            layer, kv_head = re.fullmatch(r"a(\d+)\.h(\d+)<[kv]>", destination).groups()
            for head in range(int(kv_head) * group, (int(kv_head) + 1) * group):
                edges[f"{source}->a{layer}.h{head}<{kind}>"] = dict(entry)
        else:
            edges[f"{source}->{destination}"] = entry
    meta = {"format": FORMAT, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "versions": versions()}
    meta.update({k: v for k, v in circuit.meta.items() if _jsonable(v)})
    return {"cfg": cfg, "nodes": nodes, "edges": edges, "meta": meta}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def save(circuit: Circuit, path: str | Path, expand_gqa: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(to_json_dict(circuit, expand_gqa), indent=1))


def load(path: str | Path, model: Model | None = None) -> Circuit:
    """Read a circuit JSON file; with ``model``, check it against the model's graph."""
    from .circuit import Circuit

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CircuitsError(f"cannot read circuit file {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CircuitsError(f"{path} is not a valid circuit JSON file: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cfg"), dict) or not isinstance(data.get("edges"), dict):
        raise CircuitsError(f"{path} is not a circuit file: it needs 'cfg' and 'edges' objects")
    graph = _graph_for(data["cfg"], model, path)
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    scores = torch.full((graph.n_src, graph.n_dst), float("nan"))
    for name, entry in data["edges"].items():
        i, j = _edge_index(graph, name, path)
        if not isinstance(entry, dict):
            raise CircuitsError(f"{path}: edge {name!r} must map to an object with 'score' and 'in_graph'")
        mask[i, j] |= bool(entry.get("in_graph", False))
        score = entry.get("score")
        if score is not None:
            if not isinstance(score, (int, float)):
                raise CircuitsError(f"{path}: edge {name!r} has a non-numeric score {score!r}")
            scores[i, j] = float(score)
    for name in data.get("nodes", {}):
        if name != "logits":
            try:
                graph.source_index(name)
            except ValueError:
                raise CircuitsError(f"{path}: unknown node {name!r} for this model's graph ({graph!r})") from None
    has_scores = bool((~scores.isnan()).any())
    return Circuit(graph, mask, scores=scores if has_scores else None, meta=data.get("meta", {}))


def _graph_for(cfg: dict, model: Model | None, path: Path) -> Graph:
    try:
        n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
        n_kv_heads = int(cfg.get("n_kv_heads") or cfg.get("n_key_value_heads") or n_heads)
        parallel = bool(cfg.get("parallel_attn_mlp", cfg.get("parallel", False)))
        graph = Graph(n_layers, n_heads, n_kv_heads, parallel)
    except (KeyError, TypeError, ValueError) as error:
        raise CircuitsError(f"{path}: bad 'cfg' ({error}); it needs n_layers and n_heads") from None
    if model is not None:
        ours = model.graph
        if (ours.n_layers, ours.n_heads, ours.parallel) != (graph.n_layers, graph.n_heads, graph.parallel) or (
            "n_kv_heads" in cfg and ours.n_kv_heads != graph.n_kv_heads
        ):
            raise CircuitsError(f"{path} is for a graph of {graph!r}, but the model has {ours!r}")
        return ours
    return graph


def _edge_index(graph: Graph, name: str, path: Path) -> tuple[int, int]:
    """Index of an edge name; MIB's per-query-head k/v names map to their key/value head."""
    match = re.fullmatch(r"(.+)->a(\d+)\.h(\d+)<([kv])>", name)
    if match and int(match[3]) >= graph.n_kv_heads and int(match[3]) < graph.n_heads:
        group = graph.n_heads // graph.n_kv_heads
        name = f"{match[1]}->a{match[2]}.h{int(match[3]) // group}<{match[4]}>"
    try:
        return graph.index(name)
    except ValueError as error:
        raise CircuitsError(f"{path}: unknown edge {name!r} for this graph: {error}") from None


def to_networkx(circuit: Circuit) -> nx.DiGraph:
    """The circuit as a DiGraph.

    Nodes: the source nodes (``input``, heads, MLPs), each attention input the circuit uses
    (``aL.hH<q>``, ``aL.hG<k>``, ``aL.hG<v>``) and ``logits``; attributes ``layer``, ``kind``,
    ``head``. Circuit edges carry ``score`` and ``qkv`` (None for MLP and logits inputs); an
    attention input is linked to the head(s) it feeds by an edge with ``internal=True``, so that
    paths through the network follow the computation.
    """
    graph = circuit.graph
    digraph = nx.DiGraph()
    for node in circuit.nodes:
        digraph.add_node(node, **node_attributes(graph, node))
    rows, cols = circuit.mask.nonzero(as_tuple=True)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        source, destination = graph.sources[i], graph.destinations[j]
        kind = qkv_of(destination)
        score = None if circuit.scores is None else float(circuit.scores[i, j])
        if source not in digraph:
            digraph.add_node(source, **node_attributes(graph, source))
        if kind is None:
            digraph.add_node(destination, **node_attributes(graph, destination))
            digraph.add_edge(source, destination, score=score, qkv=None, internal=False)
            continue
        digraph.add_node(destination, **node_attributes(graph, destination), qkv=kind)
        digraph.add_edge(source, destination, score=score, qkv=kind, internal=False)
        for head in graph.feeds[j].nonzero().flatten().tolist():
            digraph.add_node(graph.sources[head], **node_attributes(graph, graph.sources[head]))
            digraph.add_edge(destination, graph.sources[head], score=None, qkv=kind, internal=True)
    return digraph


def to_graphml(circuit: Circuit, path: str | Path) -> Path:
    """GraphML of ``to_networkx`` (None attributes written as empty strings, as GraphML needs)."""
    digraph = to_networkx(circuit)
    for _, data in digraph.nodes(data=True):
        for key, value in data.items():
            data[key] = "" if value is None else value
    for _, _, data in digraph.edges(data=True):
        for key, value in data.items():
            data[key] = "" if value is None else value
    return atomic_write_text(path, "\n".join(nx.generate_graphml(digraph)) + "\n")


def to_dot(circuit: Circuit) -> str:
    """DOT text: one node per source node and ``logits``; q/k/v edges coloured, width by |score|."""
    graph = circuit.graph
    colours = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", None: "#555555"}
    scores = circuit.scores
    largest = float(scores[circuit.mask].abs().max()) if scores is not None and len(circuit) else 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontsize=10, fontname="Helvetica"];']
    lines += [f'  "{node}";' for node in circuit.nodes]
    rows, cols = circuit.mask.nonzero(as_tuple=True)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        destination = graph.destinations[j]
        kind = qkv_of(destination)
        fed = graph.feeds[j].nonzero().flatten().tolist()  # a GQA k/v input feeds its group's heads
        targets = [graph.sources[head] for head in fed] if kind else [destination]
        attributes = [f'color="{colours[kind]}"']
        if kind:
            attributes.append(f'label="{kind}"')
        if scores is not None and largest > 0:
            score = float(scores[i, j])
            attributes.append(f"penwidth={0.5 + 3 * abs(score) / largest:.2f}")
            if score < 0:
                attributes.append("style=dashed")
        lines += [f'  "{graph.sources[i]}" -> "{target}" [{", ".join(attributes)}];' for target in targets]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_frame(circuit: Circuit) -> pd.DataFrame:
    """One row per circuit edge: edge, src, dst, qkv, score."""
    graph = circuit.graph
    rows, cols = circuit.mask.nonzero(as_tuple=True)
    destinations = [graph.destinations[j] for j in cols.tolist()]
    return pd.DataFrame(
        {
            "edge": circuit.edges,
            "src": [graph.sources[i] for i in rows.tolist()],
            "dst": destinations,
            "qkv": [qkv_of(d) for d in destinations],
            "score": [
                float("nan") if circuit.scores is None else float(circuit.scores[i, j])
                for i, j in zip(rows.tolist(), cols.tolist(), strict=True)
            ],
        }
    )
