"""Circuit files and views: EAP-IG/MIB JSON, NetworkX, GraphML, DOT, pandas.

JSON layout (read and written): ``{"cfg": {...}, "nodes": {name: {"in_graph": bool}},
"edges": {name: {"score": float | null, "in_graph": bool}}, "meta": {...}}`` with every edge
of the graph listed (``full=True``, the layout EAP-IG and MIB read), or only the circuit's own
edges and nodes (``full=False``: a few KB instead of MBs; an edge not listed is not in the circuit).
For grouped-query models ``to_mib_json`` repeats each ``<k>``/``<v>`` edge for every query head of
its key/value group, as MIB's ungrouped graphs name them; loading accepts every form.
"""

from __future__ import annotations

import datetime
import json
import math
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from .errors import CircuitsError
from .graph import Graph
from .io import atomic_write_text, write_json
from .spans import Spans
from .units import real_edges, unit_names
from .version import DISTRIBUTION

if TYPE_CHECKING:
    import networkx as nx
    import pandas as pd

FORMAT = "circuits/eap-ig-json"
NEURON_ROWS = {"neuron": "sources", "mlp-neuron": "mlps"}  # what a neuron level's rows are, in the file


class EdgeSet(Protocol):
    """What the writers read of a circuit: a mask over a graph's units, optional scores and metadata."""

    graph: Graph
    mask: torch.Tensor  # bool [n_src, n_dst] ([n_src, n_dst, S] by span; [rows, width] neurons)
    scores: torch.Tensor | None  # float, the mask's shape
    meta: dict
    level: str
    spans: Spans | None


class CircuitData(NamedTuple):
    """What a circuit file holds, as the dense tensors ``circuits.Circuit`` is built from."""

    graph: Graph
    mask: torch.Tensor
    scores: torch.Tensor | None
    meta: dict
    level: str = "edge"
    spans: Spans | None = None


def node_attributes(graph: Graph, name: str) -> dict[str, Any]:
    """``layer``, ``kind`` (input/attn/mlp/logits) and ``head`` of a node or destination name."""
    node = graph.node(name)
    return {"layer": node.layer, "kind": node.kind, "head": node.head}


def versions() -> dict[str, str]:
    found = {}
    for package in (DISTRIBUTION, "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def to_json_dict(circuit: EdgeSet, expand_gqa: bool = False, full: bool = True) -> dict[str, Any]:
    """The file's content. Edges by span are named ``src->dst@span`` and the file holds the ``spans`` layout;
    a neuron circuit lists, per source (``neuron``) or MLP (``mlp-neuron``), every unit's score and in_graph."""
    graph, scores, spans = circuit.graph, circuit.scores, circuit.spans
    cfg = {
        "n_layers": graph.n_layers,
        "n_heads": graph.n_heads,
        "n_kv_heads": graph.n_kv_heads,
        "parallel_attn_mlp": graph.parallel,
    }
    meta = {"format": FORMAT, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "versions": versions()}
    meta.update({k: v for k, v in circuit.meta.items() if _jsonable(v)})
    if circuit.level != "edge":
        return {"cfg": cfg, "level": circuit.level, NEURON_ROWS[circuit.level]: _neuron_rows(circuit), "meta": meta}
    edge_mask = circuit.mask if spans is None else circuit.mask.any(2)
    in_graph_nodes = graph.nodes_of(edge_mask)
    listed_nodes = [*graph.sources, "logits"] if full else in_graph_nodes
    nodes = {name: {"in_graph": name in in_graph_nodes} for name in listed_nodes}
    edges = {}
    real = real_edges(graph, spans)
    for index in (real if full else circuit.mask & real).nonzero().tolist():
        at = tuple(index)
        score = None if scores is None or math.isnan(float(scores[at])) else float(scores[at])
        entry = {"score": score, "in_graph": bool(circuit.mask[at])}
        i, j = index[:2]
        suffix = "" if spans is None else f"@{spans.names[index[2]]}"
        names = graph.ungrouped_names(j) if expand_gqa else [graph.destinations[j]]
        for destination in names:
            edges[f"{graph.sources[i]}->{destination}{suffix}"] = dict(entry)
    layout = {} if spans is None else {"spans": spans.to_dict()}
    return {"cfg": cfg, **layout, "nodes": nodes, "edges": edges, "meta": meta}


def _neuron_rows(circuit: EdgeSet) -> dict[str, dict[str, list]]:
    graph = circuit.graph
    names = graph.sources if circuit.level == "neuron" else [f"m{layer}" for layer in range(graph.n_layers)]
    rows = {}
    for row, name in enumerate(names):
        scores = None if circuit.scores is None else circuit.scores[row]
        rows[name] = {
            "in_graph": circuit.mask[row].tolist(),
            "scores": None if scores is None else [None if math.isnan(v) else v for v in scores.tolist()],
        }
    return rows


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def save(circuit: EdgeSet, path: str | Path, expand_gqa: bool = False, full: bool = True) -> Path:
    """Write the circuit file, atomically and as strict JSON: a NaN or infinite score or meta value is null."""
    write_json(path, to_json_dict(circuit, expand_gqa, full))
    return Path(path)


def load(path: str | Path, graph: Graph | None = None) -> CircuitData:
    """Read a circuit JSON file (ours, EAP-IG's or MIB's); with ``graph``, check it against that graph.

    Parsed strictly: cfg counts are positive integers, ``in_graph`` is true or false, a score a finite
    number or null; errors name the file and the offending cfg value, edge or node. A cfg whose graph would
    have more than ``MAX_EDGES`` edges is refused before anything is allocated.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CircuitsError(f"cannot read circuit file {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CircuitsError(f"{path} is not a valid circuit JSON file: {error}") from None
    except RecursionError:
        raise CircuitsError(f"{path} is not a valid circuit JSON file: nested too deeply") from None
    neurons = isinstance(data, dict) and data.get("level") in NEURON_ROWS  # rows of units, no edges
    if not isinstance(data, dict) or not isinstance(data.get("cfg"), dict):
        raise CircuitsError(f"{path} is not a circuit file: it needs 'cfg' and 'edges' objects")
    if not neurons and not isinstance(data.get("edges"), dict):
        raise CircuitsError(f"{path} is not a circuit file: it needs 'cfg' and 'edges' objects")
    for key in ("nodes", "meta"):
        if not isinstance(data.get(key, {}), dict):
            raise CircuitsError(f"{path}: '{key}' must be an object, got {type(data[key]).__name__}")
    graph = _graph_for(data["cfg"], graph, path)
    level = data.get("level", "edge")
    if level in NEURON_ROWS:
        return _load_neurons(data, graph, level, path)
    if level != "edge":
        raise CircuitsError(f"{path}: unknown level {level!r}")
    spans = None if "spans" not in data else Spans.from_dict(data["spans"])
    shape = (graph.n_src, graph.n_dst) + (() if spans is None else (len(spans),))
    mask = torch.zeros(shape, dtype=torch.bool)
    scores = torch.full(shape, float("nan"))
    # MIB's ungrouped layout names a grouped-query model's k/v inputs per query head: a file is in it
    # when some destination is not one of ours (a head index past the key/value heads).
    destinations = {name.partition("->")[2].partition("@")[0] for name in data["edges"]}
    ungrouped = graph.group_size > 1 and not destinations <= set(graph.destinations)
    for name, entry in data["edges"].items():
        edge, _, span = name.partition("@") if spans is not None else (name, "", "")
        if spans is not None and not span:
            raise CircuitsError(f"{path}: edge {name!r} names no span; a file with spans names edges 'src->dst@span'")
        index = _edge_index(graph, edge, path, ungrouped)
        if spans is not None:
            index = (*index, _span_index(spans, span, path, name))
        if not isinstance(entry, dict):
            raise CircuitsError(f"{path}: edge {name!r} must map to an object with 'score' and 'in_graph'")
        mask[index] |= _in_graph(entry, f"{path}: edge {name!r}")
        score = entry.get("score")
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                kind = "non-finite" if isinstance(score, float) else "non-numeric"
                raise CircuitsError(f"{path}: edge {name!r} has a {kind} score {score!r}; a score is a number or null")
            scores[index] = float(score)
    for name, entry in data.get("nodes", {}).items():
        if name != "logits":
            try:
                graph.source_index(name)
            except ValueError:
                raise CircuitsError(f"{path}: unknown node {name!r} for this model's graph ({graph!r})") from None
        if not isinstance(entry, dict):
            raise CircuitsError(f"{path}: node {name!r} must map to an object with 'in_graph'")
        _in_graph(entry, f"{path}: node {name!r}")
    has_scores = bool((~scores.isnan()).any())
    return CircuitData(graph, mask, scores if has_scores else None, data.get("meta", {}), "edge", spans)


def _span_index(spans: Spans, span: str, path: Path, name: str) -> int:
    if span not in spans.names:
        raise CircuitsError(f"{path}: edge {name!r} names span {span!r}, which is not one of {', '.join(spans.names)}")
    return spans.names.index(span)


def _load_neurons(data: dict, graph: Graph, level: str, path: Path) -> CircuitData:
    """A neuron circuit's rows: every row listed, each with one in_graph and one score (or null) per unit."""
    key = NEURON_ROWS[level]
    rows = data.get(key)
    names = graph.sources if level == "neuron" else [f"m{layer}" for layer in range(graph.n_layers)]
    if not isinstance(rows, dict) or set(rows) != set(names):
        raise CircuitsError(f"{path}: a {level} circuit lists '{key}', one entry for each of {', '.join(names[:3])}...")
    width = None
    masks, scores = [], []
    for name in names:
        entry = rows[name]
        kept = entry.get("in_graph") if isinstance(entry, dict) else None
        values = entry.get("scores") if isinstance(entry, dict) else None
        if not isinstance(kept, list) or not all(isinstance(k, bool) for k in kept) or not kept:
            raise CircuitsError(f"{path}: {name!r} needs 'in_graph', a list of true or false, one per unit")
        width = len(kept) if width is None else width
        if len(kept) != width or (values is not None and (not isinstance(values, list) or len(values) != width)):
            raise CircuitsError(f"{path}: {name!r} lists {len(kept)} units where the first row lists {width}")
        for value in values or []:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CircuitsError(f"{path}: {name!r} has a non-numeric score {value!r}; a score is a number or null")
        masks.append(kept)
        scores.append([float("nan") if v is None else float(v) for v in values] if values else [float("nan")] * width)
    score_tensor = torch.tensor(scores)
    has_scores = bool((~score_tensor.isnan()).any())
    return CircuitData(
        graph, torch.tensor(masks), score_tensor if has_scores else None, data.get("meta", {}), level, None
    )


MAX_EDGES = 10**8  # a circuit file's graph larger than this is refused (its tensors would take GBs)


def _in_graph(entry: dict, what: str) -> bool:
    value = entry.get("in_graph", False)
    if not isinstance(value, bool):
        raise CircuitsError(f"{what}: in_graph must be true or false, got {value!r}")
    return value


def edge_count(n_layers: int, n_heads: int, n_kv_heads: int, parallel: bool) -> int:
    """How many edges ``Graph(n_layers, n_heads, n_kv_heads, parallel)`` has, without building it."""
    width = n_heads + 1  # sources per layer
    reads = n_layers + width * n_layers * (n_layers - 1) // 2  # sum over layers of the sources before it
    logits = 1 + n_layers * width
    return (n_heads + 2 * n_kv_heads + 1) * reads + (0 if parallel else n_layers * n_heads) + logits


def _graph_for(cfg: dict, ours: Graph | None, path: Path) -> Graph:
    def count(key: str, *aliases: str, default: int | None = None) -> int:
        present = [k for k in (key, *aliases) if cfg.get(k) is not None]
        if not present:
            if default is None:
                raise CircuitsError(f"{path}: bad 'cfg': it lacks {key!r}; it needs n_layers and n_heads")
            return default
        value = cfg[present[0]]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitsError(f"{path}: bad 'cfg': {present[0]} must be a positive integer, got {value!r}")
        return value

    n_layers, n_heads = count("n_layers"), count("n_heads")
    n_kv_heads = count("n_kv_heads", "n_key_value_heads", default=n_heads)
    key = "parallel_attn_mlp" if "parallel_attn_mlp" in cfg else "parallel"
    parallel = cfg.get(key, False)
    if not isinstance(parallel, bool):
        raise CircuitsError(f"{path}: bad 'cfg': {key} must be true or false, got {parallel!r}")
    if n_heads % n_kv_heads:
        raise CircuitsError(f"{path}: bad 'cfg': n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    edges = edge_count(n_layers, n_heads, n_kv_heads, parallel)
    if edges > MAX_EDGES:
        raise CircuitsError(
            f"{path}: bad 'cfg': n_layers {n_layers}, n_heads {n_heads}, n_kv_heads {n_kv_heads} make a graph of "
            f"{edges:,} edges, more than the {MAX_EDGES:,} a circuit file may have"
        )
    graph = Graph(n_layers, n_heads, n_kv_heads, parallel)
    if ours is not None:
        if (ours.n_layers, ours.n_heads, ours.parallel) != (graph.n_layers, graph.n_heads, graph.parallel) or (
            "n_kv_heads" in cfg and ours.n_kv_heads != graph.n_kv_heads
        ):
            raise CircuitsError(f"{path} is for a graph of {graph!r}, but the model has {ours!r}")
        return ours
    return graph


def _edge_index(graph: Graph, name: str, path: Path, ungrouped: bool) -> tuple[int, int]:
    try:
        return graph.index(name, ungrouped)
    except ValueError as error:
        raise CircuitsError(f"{path}: unknown edge {name!r} for this graph: {error}") from None


def to_networkx(circuit: EdgeSet) -> nx.DiGraph:
    """The circuit as a DiGraph.

    Nodes: the source nodes (``input``, heads, MLPs), each attention input the circuit uses
    (``aL.hH<q>``, ``aL.hG<k>``, ``aL.hG<v>``) and ``logits``; attributes ``layer``, ``kind``,
    ``head``. Circuit edges carry ``score`` and ``qkv`` (None for MLP and logits inputs); an
    attention input is linked to the head(s) it feeds by an edge with ``internal=True``, so that
    paths through the network follow the computation.
    """
    import networkx as nx

    graph = circuit.graph
    if circuit.level != "edge":
        raise CircuitsError(f"a {circuit.level}-level circuit has no edges to draw as a graph; see Circuit.to_frame")
    if circuit.spans is not None:
        return _span_networkx(circuit)
    digraph = nx.DiGraph()
    for node in graph.nodes_of(circuit.mask):
        digraph.add_node(node, **node_attributes(graph, node))
    rows, cols = circuit.mask.nonzero(as_tuple=True)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        source, destination = graph.sources[i], graph.destinations[j]
        kind = graph.destination_nodes[j].qkv
        score = None if circuit.scores is None else float(circuit.scores[i, j])
        if source not in digraph:
            digraph.add_node(source, **node_attributes(graph, source))
        if kind is None:
            digraph.add_node(destination, **node_attributes(graph, destination))
            digraph.add_edge(source, destination, score=score, qkv=None, internal=False)
            continue
        digraph.add_node(destination, **node_attributes(graph, destination), qkv=kind)
        digraph.add_edge(source, destination, score=score, qkv=kind, internal=False)
        for head in graph.fed_nodes(j):
            digraph.add_node(graph.sources[head], **node_attributes(graph, graph.sources[head]))
            digraph.add_edge(destination, graph.sources[head], score=None, qkv=kind, internal=True)
    return digraph


def _span_networkx(circuit: EdgeSet) -> nx.DiGraph:
    """``to_networkx`` of a circuit by span: nodes are (node, span) pairs named ``node@span`` with a ``span``
    attribute; an edge joins ``src@s`` to ``dst@s``; a query or MLP input at s feeds its node at s, a key or value
    input at a its head at every span b it reaches (``Spans.reaches``) where that head is in the circuit."""
    import networkx as nx

    graph, spans, scores = circuit.graph, circuit.spans, circuit.scores
    digraph = nx.DiGraph()

    def add(name: str, span: int, **extra) -> str:
        node = f"{name}@{spans.names[span]}"
        if node not in digraph:
            digraph.add_node(node, **node_attributes(graph, name), span=spans.names[span], **extra)
        return node

    present = circuit.mask.any(1)  # [n_src, S]: a node at a span with a kept edge out of it
    for i, j, s in circuit.mask.nonzero().tolist():
        kind = graph.destination_nodes[j].qkv
        score = None if scores is None else float(scores[i, j, s])
        source = add(graph.sources[i], s)
        destination = add(graph.destinations[j], s, **({"qkv": kind} if kind else {}))
        digraph.add_edge(source, destination, score=score, qkv=kind, internal=False, span=spans.names[s])
        if kind is None:
            continue
        targets = [s] if kind == "q" else spans.reaches[s].nonzero().flatten().tolist()
        for head in graph.fed_nodes(j):
            for target in targets:
                if present[head, target] or target == s:
                    head_node = add(graph.sources[head], target)
                    digraph.add_edge(destination, head_node, score=None, qkv=kind, internal=True, span=None)
    return digraph


def to_graphml(circuit: EdgeSet, path: str | Path) -> Path:
    """GraphML of ``to_networkx`` (None attributes written as empty strings, as GraphML needs)."""
    import networkx as nx

    digraph = to_networkx(circuit)
    for _, data in digraph.nodes(data=True):
        for key, value in data.items():
            data[key] = "" if value is None else value
    for _, _, data in digraph.edges(data=True):
        for key, value in data.items():
            data[key] = "" if value is None else value
    return atomic_write_text(path, "\n".join(nx.generate_graphml(digraph)) + "\n")


def to_dot(circuit: EdgeSet) -> str:
    """DOT text: one node per source node and ``logits``; q/k/v edges coloured, width by |score|."""
    graph = circuit.graph
    if circuit.level != "edge" or circuit.spans is not None:
        raise CircuitsError("DOT draws whole edges: use to_networkx (by span) or to_frame (neurons)")
    colours = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", None: "#555555"}
    scores = circuit.scores
    largest = float(scores[circuit.mask].abs().max()) if scores is not None and circuit.mask.any() else 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontsize=10, fontname="Helvetica"];']
    lines += [f'  "{node}";' for node in graph.nodes_of(circuit.mask)]
    rows, cols = circuit.mask.nonzero(as_tuple=True)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        destination = graph.destinations[j]
        kind = graph.destination_nodes[j].qkv
        fed = graph.fed_nodes(j)  # a GQA k/v input feeds its group's heads
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


def read_scores_csv(path: str | Path, graph: Graph) -> torch.Tensor:
    """Edge scores ``[n_src, n_dst]`` from a table with ``edge`` and ``score`` columns (``Scores.to_frame``'s CSV);
    every edge of ``graph`` must have one finite score. Errors name the file and the offending row or edge."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise CircuitsError(f"cannot read scores file {path}: {error}") from None
    if not {"edge", "score"} <= set(table.columns):
        raise CircuitsError(f"{path} needs 'edge' and 'score' columns, it has {', '.join(map(str, table.columns))}")
    scores = torch.full((graph.n_src, graph.n_dst), float("nan"))
    for row, (name, score) in enumerate(zip(table["edge"], table["score"], strict=True), start=2):
        try:
            i, j = graph.index(str(name))
            value = float(score)
        except (CircuitsError, ValueError) as error:
            raise CircuitsError(f"{path}, line {row}: {error}") from None
        if not math.isfinite(value):
            raise CircuitsError(f"{path}, line {row}: edge {name!r} has score {score!r}; scores must be finite")
        scores[i, j] = value
    missing = (scores.isnan() & graph.real).nonzero()
    if len(missing):
        i, j = missing[0].tolist()
        raise CircuitsError(f"{path} has no score for edge {graph.edge_name(i, j)} ({len(missing)} edge(s) missing)")
    return scores


def edge_frame(
    graph: Graph, mask: torch.Tensor, scores: torch.Tensor | None, spans: Spans | None = None
) -> pd.DataFrame:
    """One row per edge of ``mask``, in ``graph.edges`` order: edge, src, dst, qkv, score (NaN without scores);
    by span, the edge at each span (``src->dst@span``) with a span column."""
    import pandas as pd

    index = mask.nonzero()
    rows, cols = index[:, 0].tolist(), index[:, 1].tolist()
    columns = {
        "edge": unit_names(graph, "edge", spans, index),
        "src": [graph.sources[i] for i in rows],
        "dst": [graph.destinations[j] for j in cols],
    }
    if spans is not None:
        columns["span"] = [spans.names[s] for s in index[:, 2].tolist()]
    columns["qkv"] = [graph.destination_nodes[j].qkv for j in cols]
    columns["score"] = (torch.full((len(index),), float("nan")) if scores is None else scores[tuple(index.T)]).tolist()
    return pd.DataFrame(columns)


def neuron_frame(graph: Graph, level: str, mask: torch.Tensor, scores: torch.Tensor | None) -> pd.DataFrame:
    """One row per unit of ``mask``: name, node (the source, or the MLP ``mL``), unit (its index), score."""
    import pandas as pd

    index = mask.nonzero()
    rows = index[:, 0].tolist()
    return pd.DataFrame(
        {
            "name": unit_names(graph, level, None, index),
            "node": [graph.sources[r] for r in rows] if level == "neuron" else [f"m{r}" for r in rows],
            "unit": index[:, 1].tolist(),
            "score": (torch.full((len(index),), float("nan")) if scores is None else scores[tuple(index.T)]).tolist(),
        }
    )
