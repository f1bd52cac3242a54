"""Figures: a circuit as a layered graph, and faithfulness against circuit size.

Matplotlib only (no graphviz). Figures saved to a path are written atomically and are
not registered with pyplot, so saving many in a loop leaves no figures open.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import PathPatch
from matplotlib.path import Path as MplPath

from .errors import CircuitsError
from .io import atomic_write
from .units import real_edges

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies); MLP/logits inputs neutral.
EDGE_COLORS: dict[str, str] = {"q": "#0072B2", "k": "#E69F00", "v": "#009E73", "mlp": "#7A7A7A"}
FORMATS: dict[str, str] = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
PNG_DPI = 200
FRACTION_GRID = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)  # percent of edges

# Vertical positions in layer units: heads of layer L at y = L, its MLP half a layer above.
_MLP_RISE = 0.5
_MLP_SHIFT = 1.25  # the MLP column sits this far right of the last head, clear of the heads' columns
_GROUP_DROP = 0.24  # key/value group markers sit this far below their heads
_INPUT_Y = -0.8
_LOGITS_RISE = 0.8  # above the last MLP row
_FONT = 6.0


def edge_kind(graph: Any, destination: str) -> str:
    """``"q"``, ``"k"`` or ``"v"`` for an attention destination, ``"mlp"`` for an MLP input or ``logits``."""
    return graph.node(destination).qkv or "mlp"


def plot_circuit(
    circuit: Any,
    path_or_ax: str | os.PathLike | Axes | None = None,
    *,
    title: str | None = None,
    max_width_edges: float = 3.0,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Draw a circuit as a layered graph: ``input`` at the bottom, ``logits`` at the top, one row per layer.

    Layout: layer ``L``'s attention heads sit in order on row ``L`` and its MLP ``mL`` in a sub-row
    just above them (in sequential blocks the MLP reads after the attention), in a column of MLPs
    to the right of the heads so that MLP nodes never stack on a head's column. Nodes that
    are an end of a circuit edge are drawn as labelled boxes; the others of the graph as faint
    dots, so the model's shape stays visible without cluttering the figure. Edges always run
    upwards, from the source node to the node that reads them, drawn as gentle curves so that
    edges between nodes of one column do not hide behind the nodes in between.

    Colours: edges into a head's query (``<q>``), key (``<k>``) and value (``<v>``) in three
    colours (``EDGE_COLORS``), edges into an MLP or ``logits`` in grey. Line width grows with
    ``|score|`` up to ``max_width_edges`` points for the circuit's largest ``|score|``; edges with
    a negative score (ablating them lowers the metric, as scores are metric(ablated) minus
    metric(clean)) are dashed. Without ``circuit.scores`` every edge has the same width and is solid.

    Grouped-query attention: a ``<k>``/``<v>`` destination ``aL.hG<k>`` is key/value head ``G``,
    shared by query heads ``G*r ... (G+1)*r - 1`` (``r = n_heads / n_kv_heads``). Its edges end at a
    group marker, a bracket just below those query heads, rather than at any one of them. With
    ``n_kv_heads == n_heads`` they end at the head itself.

    Every edge is a ``PathPatch`` whose ``gid`` is the edge name (also the element id in SVG output).

    ``path_or_ax``: ``None`` returns a new pyplot figure (close it with ``plt.close(fig)``); a path
    ending in ``.png`` (``dpi=200``), ``.pdf`` or ``.svg`` saves the figure there atomically and
    returns it (a figure not registered with pyplot, so nothing stays open); an ``Axes`` is drawn
    into (``figsize`` is then ignored; the legend goes below it) and its figure returned. An
    unknown extension raises CircuitsError before anything is drawn or written.
    ``title=None`` gives a summary title (edge and node counts, plus ``meta`` task/method when
    present); ``title=""`` gives none.
    """
    if getattr(circuit, "level", "edge") != "edge":
        return plot_neurons(circuit, path_or_ax, title=title, figsize=figsize)
    if getattr(circuit, "spans", None) is not None:
        return plot_position_circuit(circuit, path_or_ax, title=title, max_width_edges=max_width_edges, figsize=figsize)
    graph = circuit.graph
    path, ax = _target(path_or_ax)
    fig = _figure(ax, figsize or _circuit_figsize(graph), pyplot=path is None)
    ax = ax if ax is not None else fig.add_subplot()

    mask = torch.as_tensor(circuit.mask).bool().cpu() & graph.real
    rows, cols = mask.nonzero(as_tuple=True)
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    scores = None
    if circuit.scores is not None:
        scores = torch.nan_to_num(torch.as_tensor(circuit.scores).detach().float().cpu()[rows, cols]).tolist()

    positions = _positions(graph)
    group = graph.group_size
    _draw_background(ax, graph, positions)

    # Edges, weakest first so that the strongest end up on top.
    largest = max((abs(s) for s in scores), default=0.0) if scores is not None else 0.0
    order = sorted(range(len(pairs)), key=lambda e: abs(scores[e]) if scores is not None else 0.0)
    # Nodes and key/value group markers to draw, as dicts (insertion-ordered, unlike a set of strings, whose
    # order follows PYTHONHASHSEED) and drawn sorted, so that the same circuit gives the same file bytes.
    ends: dict[str, None] = {}
    groups: dict[tuple[int, int], None] = {}
    for rank, e in enumerate(order):
        i, j = pairs[e]
        source, destination = graph.sources[i], graph.destinations[j]
        kind = edge_kind(graph, destination)
        end, node = _destination_point(graph, destination, positions)
        if node is None:
            facts = graph.node(destination)
            groups[facts.layer, facts.head] = None
        else:
            ends[node] = None
        ends[source] = None
        width, dashed = 1.0, False
        if scores is not None:
            width = 0.35 + (max_width_edges - 0.35) * (abs(scores[e]) / largest if largest > 0 else 1.0)
            dashed = scores[e] < 0
        # Edges within the MLP column bow out to the right, into the margin; others alternate sides.
        bend = 1 if min(positions[source][0], end[0]) > graph.n_heads - 0.5 or (i + j) % 2 else -1
        patch = PathPatch(
            _curve(positions[source], end, bend),
            facecolor="none",
            edgecolor=EDGE_COLORS[kind],
            linewidth=width,
            linestyle=(0, (3.0, 1.6)) if dashed else "-",
            alpha=0.75,
            capstyle="round",
            zorder=1 + rank / max(len(pairs), 1),
        )
        patch.set_gid(f"{source}->{destination}")
        ax.add_patch(patch)

    for layer, kv_head in sorted(groups):
        left, right = kv_head * group - 0.32, (kv_head + 1) * group - 1 + 0.32
        y = layer - _GROUP_DROP
        ax.plot([left, left, right, right], [y + 0.1, y, y, y + 0.1], color="#333333", lw=0.7, zorder=2.5)
        ax.plot([(left + right) / 2], [y], marker="o", ms=2.2, color="#333333", zorder=2.6)
    rank_of = {name: k for k, name in enumerate(positions)}  # graph order: input, heads and MLPs, logits
    for name in sorted(ends, key=rank_of.__getitem__):
        _draw_node(ax, graph.node(name).kind, name, positions[name])

    _decorate(ax, graph, positions)
    ax.legend(
        handles=_legend_handles(scores is not None, group > 1 and bool(groups)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.04),
        ncol=4,
        fontsize=_FONT + 0.5,
        frameon=False,
        handlelength=2.6,
        columnspacing=1.2,
    )
    if title is None:
        title = _summary_title(circuit, len(pairs))
    if title:
        ax.set_title(title, fontsize=_FONT + 3)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_position_circuit(
    circuit: Any,
    path_or_ax: str | os.PathLike | Axes | None = None,
    *,
    title: str | None = None,
    max_width_edges: float = 3.0,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """A circuit by span, one column per span (in the spans' order), layers upwards as in ``plot_circuit``.

    A column holds the nodes that have a circuit edge at that span, side by side per layer. An edge into a query,
    an MLP or ``logits`` stays in its column; an edge into a key or value at span a runs from its source in column
    a to its head in every column b the head is used at that attention can carry a to (``Spans.reaches``):
    the arrows across columns are information moving between positions. Colours, widths and dashes as in
    ``plot_circuit``; every edge's ``gid`` is its name ``src->dst@span``. Saving as for ``plot_circuit``.
    """
    graph, spans = circuit.graph, circuit.spans
    mask = torch.as_tensor(circuit.mask).bool().cpu() & real_edges(graph, spans)
    edges = mask.nonzero().tolist()
    scores = None if circuit.scores is None else torch.nan_to_num(circuit.scores.float().cpu())
    sends = mask.any(1)  # [n_src, S]: a node with a circuit edge out of it at a span

    def targets(j: int, span: int) -> list[tuple[str, int]]:
        """The (node, span) pairs an edge into destination j at ``span`` ends at."""
        node = graph.destination_nodes[j]
        if node.qkv is None:
            return [(node.name, span)]
        heads = graph.fed_nodes(j)
        if node.qkv == "q":
            return [(graph.sources[h], span) for h in heads]
        reached = [b for b in range(len(spans)) if spans.reaches[span, b]]
        ends = [(graph.sources[h], b) for h in heads for b in reached if sends[h, b]]
        return ends or [(graph.sources[h], span) for h in heads]

    drawn = [(i, j, span, end) for i, j, span in edges for end in targets(j, span)]
    shown: dict[tuple[str, int], None] = {}
    for i, _, span, end in drawn:
        shown[graph.sources[i], span] = None
        shown[end] = None
    slots: dict[tuple[str, int], int] = {}  # (node, span) -> its place among its row's nodes in that column
    rows: dict[tuple[int, float], list[str]] = {}
    for name, span in sorted(shown, key=lambda key: (key[1], _row(graph, key[0]), graph.node(key[0]).head or 0)):
        row = rows.setdefault((span, _row(graph, name)), [])
        slots[name, span] = len(row)
        row.append(name)
    # each column as wide as its fullest row (in node slots), so that a span with few nodes takes little room
    widths = [
        max([len(row) for (span, _), row in rows.items() if span == column] + [1]) + 0.6 for column in range(len(spans))
    ]
    starts = [sum(widths[:column]) for column in range(len(spans))]
    centres = [start + (width - 1.6) / 2 for start, width in zip(starts, widths, strict=True)]
    total = sum(widths)

    def point(name: str, span: int) -> tuple[float, float]:
        kind = graph.node(name).kind
        x = centres[span] if kind in ("input", "logits") else starts[span] + slots[name, span]
        return x, _row(graph, name)

    path, ax = _target(path_or_ax)
    size = figsize or (min(24.0, max(5.0, 0.75 * total + 1.5)), max(3.5, 0.4 * (graph.n_layers + 2) + 1.3))
    fig = _figure(ax, size, pyplot=path is None)
    ax = ax if ax is not None else fig.add_subplot()
    for layer in range(0, graph.n_layers, 2):
        ax.axhspan(layer - 0.42, layer + 0.58, color="#F3F3F3", lw=0, zorder=0)
    largest = float(scores[mask].abs().max()) if scores is not None and mask.any() else 0.0
    order = sorted(drawn, key=lambda edge: abs(float(scores[edge[:3]])) if scores is not None else 0.0)
    for rank, (i, j, span, (name, column)) in enumerate(order):
        source, destination = graph.sources[i], graph.destinations[j]
        start, end = point(source, span), point(name, column)
        score = None if scores is None else float(scores[i, j, span])
        line = 1.0 if score is None else 0.35 + (max_width_edges - 0.35) * (abs(score) / largest if largest else 1.0)
        patch = PathPatch(
            _curve(start, end, 1 if (i + j) % 2 else -1),
            facecolor="none",
            edgecolor=EDGE_COLORS[edge_kind(graph, destination)],
            linewidth=line,
            linestyle=(0, (3.0, 1.6)) if score is not None and score < 0 else "-",
            alpha=0.75,
            capstyle="round",
            zorder=1 + rank / max(len(order), 1),
        )
        patch.set_gid(f"{source}->{destination}@{spans.names[span]}")
        ax.add_patch(patch)
    for name, span in shown:
        _draw_node(ax, graph.node(name).kind, name, point(name, span))
    for span in range(1, len(spans)):
        ax.axvline(starts[span] - 0.8, color="#DDDDDD", lw=0.6, zorder=0)
    ax.set_xticks(centres)
    ax.set_xticklabels(spans.names, fontsize=_FONT + 1)
    ax.xaxis.tick_top()
    ax.set_xlim(-0.8, total - 0.8)
    ax.set_ylim(_INPUT_Y - 0.5, graph.n_layers - 1 + _MLP_RISE + _LOGITS_RISE + 0.5)
    ax.set_yticks(range(graph.n_layers))
    ax.set_yticklabels([str(layer) for layer in range(graph.n_layers)], fontsize=_FONT)
    ax.set_ylabel("layer (heads; MLP just above)", fontsize=_FONT + 1)
    ax.tick_params(length=0, pad=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.legend(
        handles=_legend_handles(scores is not None, False),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=4,
        fontsize=_FONT + 0.5,
        frameon=False,
        handlelength=2.6,
    )
    if title is None:
        title = _summary_title(circuit, len(edges)).replace(" edges", f" edges at {len(spans)} spans", 1)
    if title:
        ax.set_title(title, fontsize=_FONT + 3, pad=14)
    if path is not None:
        save_figure(fig, path)
    return fig


def _row(graph: Any, name: str) -> float:
    """A node's height: heads at their layer, an MLP half a layer above, ``input`` below, ``logits`` on top."""
    node = graph.node(name)
    if node.kind == "input":
        return _INPUT_Y
    if node.kind == "logits":
        return graph.n_layers - 1 + _MLP_RISE + _LOGITS_RISE
    return node.layer + (_MLP_RISE if node.kind == "mlp" else 0.0)


def plot_neurons(
    made: Any,
    path_or_ax: str | os.PathLike | Axes | None = None,
    *,
    top: int = 30,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """The ``top`` neurons of neuron-level scores or of a neuron circuit (its own units) by |score|, one bar each,
    named ``a0.h1.d17`` (an output dimension) or ``m3.n120`` (an MLP hidden unit); blue bars score > 0, orange
    < 0 (ablating the neuron lowers the metric). Saving as for ``plot_circuit``."""
    if made.level not in ("neuron", "mlp-neuron"):
        raise CircuitsError(f"plot_neurons draws neuron-level scores or circuits, got level {made.level!r}")
    scores = made.tensor if hasattr(made, "tensor") else made.scores
    if scores is None:
        raise CircuitsError("a neuron circuit without scores has no order to draw its neurons in")
    kept = made.mask if hasattr(made, "mask") else torch.ones(scores.shape, dtype=torch.bool)
    values = scores.float().cpu()[kept]
    order = values.abs().argsort(descending=True, stable=True)[:top]
    names = made.units if hasattr(made, "units") else made.names()  # in the order of ``values``
    labels = [names[k] for k in order.tolist()]
    chosen = values[order].tolist()
    path, ax = _target(path_or_ax)
    fig = _figure(ax, figsize or (5.0, max(2.5, 0.18 * len(chosen) + 1.0)), pyplot=path is None)
    ax = ax if ax is not None else fig.add_subplot()
    colours = ["#0072B2" if value > 0 else "#E69F00" for value in chosen]
    ax.barh(range(len(chosen)), chosen, color=colours)
    ax.set_yticks(range(len(chosen)))
    ax.set_yticklabels(labels, fontsize=_FONT)
    ax.invert_yaxis()
    ax.axvline(0, color="#333333", lw=0.6)
    ax.set_xlabel("score: metric(ablated) - metric(clean)", fontsize=_FONT + 1)
    ax.tick_params(labelsize=_FONT)
    if title is None:
        meta = getattr(made, "meta", None) or {}
        parts = [meta[key] for key in ("task", "method") if isinstance(meta.get(key), str)]
        title = f"{' / '.join(parts) + ': ' if parts else ''}top {len(chosen)} {made.level}s by |score|"
    if title:
        ax.set_title(title, fontsize=_FONT + 2)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_curves(
    curves: Any | Iterable[Any],
    ax: Axes | None = None,
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Faithfulness against circuit size for one or several curves, on one axes.

    Each curve has ``.frame`` (a DataFrame with ``fraction`` of edges in ``[0, 1]``, ``edges`` and
    ``faithfulness``), ``.cpr``, ``.cmd`` and ``.label``. The x axis is the percentage of edges on a
    log scale (points at 0 % cannot be shown there and are left out); dotted lines mark
    faithfulness 0 (ablated model) and 1 (full model). The legend reads ``label (CPR 0.73, CMD 0.12)``.

    ``ax``: draw into it (its figure is returned) instead of a new figure. ``path``: also save the
    figure there, atomically (``.png`` at ``dpi=200``, ``.pdf`` or ``.svg``); a new figure made for
    a path is not registered with pyplot. With neither, a new pyplot figure is returned.
    """
    curves = [curves] if hasattr(curves, "frame") else list(curves)
    if not curves:
        raise CircuitsError("plot_curves needs at least one curve")
    target = Path(path) if path is not None else None
    if target is not None:
        _format(target)
    fig = _figure(ax, (6.0, 3.8), pyplot=target is None)
    ax = ax if ax is not None else fig.add_subplot()

    for value in (0.0, 1.0):
        ax.axhline(value, color="#444444", lw=0.9, ls=(0, (4, 2)), zorder=1.5)
    for curve in curves:
        frame = curve.frame.sort_values("fraction")
        frame = frame[frame["fraction"] > 0]
        ax.plot(
            frame["fraction"] * 100,
            frame["faithfulness"],
            marker="o",
            ms=3.5,
            lw=1.4,
            label=f"{curve.label} (CPR {curve.cpr:.2f}, CMD {curve.cmd:.2f})",
        )
    ax.set_xscale("log")
    ax.set_xticks(FRACTION_GRID)
    ax.set_xticklabels([f"{g:g}%" for g in FRACTION_GRID], fontsize=8)
    ax.minorticks_off()
    ax.set_xlim(FRACTION_GRID[0] / 1.3, FRACTION_GRID[-1] * 1.3)
    ax.set_xlabel("edges in the circuit (% of the model's edges)")
    ax.set_ylabel("faithfulness")
    ax.grid(True, which="major", color="#E5E5E5", lw=0.6)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, frameon=False, loc="best")
    if title:
        ax.set_title(title)
    if target is not None:
        save_figure(fig, target)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` atomically: to a temporary file in the same folder, then renamed over ``path``.

    The format follows the extension (``.png`` at ``dpi=200``, ``.pdf``, ``.svg``); an unknown one
    raises CircuitsError before anything is written. On failure an existing file is left as it was.
    """
    path = Path(path)
    fmt = _format(path)

    def write(stream) -> None:
        # The temporary name's extension is not the format's, so the format is passed explicitly;
        # no creation date and fixed SVG ids, so that the same figure gives the same bytes on every run.
        metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
        with matplotlib.rc_context({"svg.hashsalt": "circuits"}):
            fig.savefig(stream, format=fmt, dpi=PNG_DPI, bbox_inches="tight", metadata=metadata)

    return atomic_write(path, write)


def _format(path: Path) -> str:
    """The matplotlib format for a path's extension, or ValueError naming the extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        shown = path.suffix or "(no extension)"
        raise CircuitsError(f"cannot save a figure as {shown!r} ({path}); use one of {', '.join(FORMATS)}")
    return fmt


def _target(path_or_ax: Any) -> tuple[Path | None, Axes | None]:
    """Split ``path_or_ax`` into a checked output path or an axes to draw into."""
    if path_or_ax is None:
        return None, None
    if isinstance(path_or_ax, Axes):
        return None, path_or_ax
    if isinstance(path_or_ax, (str, os.PathLike)):
        path = Path(path_or_ax)
        _format(path)  # fail before drawing or writing anything
        return path, None
    raise CircuitsError(f"path_or_ax must be None, a path or a matplotlib Axes, not {type(path_or_ax).__name__}")


def _figure(ax: Axes | None, figsize: tuple[float, float], pyplot: bool) -> Figure:
    """The axes' figure, a pyplot figure (interactive use), or a bare one (saving: nothing left open)."""
    if ax is not None:
        return ax.figure
    return plt.figure(figsize=figsize) if pyplot else Figure(figsize=figsize)


def _circuit_figsize(graph: Any) -> tuple[float, float]:
    """About 0.7 inch a head column and 0.36 inch a layer: 6-point labels stay legible at print size."""
    width = min(16.0, max(5.0, 0.72 * (graph.n_heads + _MLP_SHIFT) + 1.6))
    height = max(3.5, 0.36 * (graph.n_layers + 1.6) + 1.3)
    return width, height


def _positions(graph: Any) -> dict[str, tuple[float, float]]:
    """Data coordinates of every source node and ``logits``: heads at x = head index, MLPs in a column right
    of them, ``input`` and ``logits`` centred."""
    mlp_x = graph.n_heads - 1 + _MLP_SHIFT
    centre = mlp_x / 2
    positions = {"input": (centre, _INPUT_Y), "logits": (centre, graph.n_layers - 1 + _MLP_RISE + _LOGITS_RISE)}
    for node in graph.source_nodes:
        if node.kind == "attn":
            positions[node.name] = (float(node.head), float(node.layer))
        elif node.kind == "mlp":
            positions[node.name] = (mlp_x, node.layer + _MLP_RISE)
    return positions


def _destination_point(
    graph: Any, destination: str, positions: dict[str, tuple[float, float]]
) -> tuple[tuple[float, float], str | None]:
    """Where an edge into ``destination`` ends, and the node drawn there (None for a key/value group marker)."""
    node = graph.node(destination)
    if node.qkv is None:  # an MLP input or logits: the node itself
        return positions[destination], destination
    group = graph.group_size
    if node.qkv == "q" or group == 1:
        name = graph.sources[graph.fed_nodes(graph.destination_index(destination))[0]]
        return positions[name], name
    return ((node.head * group + (node.head + 1) * group - 1) / 2, node.layer - _GROUP_DROP), None


def _curve(start: tuple[float, float], end: tuple[float, float], bend: int) -> MplPath:
    """A cubic Bezier from ``start`` up to ``end``, leaving and arriving vertically, bowed sideways by its span."""
    (x0, y0), (x1, y1) = start, end
    rise = max(y1 - y0, 0.1)
    bow = bend * min(0.15 + 0.07 * rise, 1.2) * (1.0 if abs(x1 - x0) < 0.5 else 0.5)
    vertices = [(x0, y0), (x0 + bow, y0 + 0.4 * rise), (x1 + bow, y1 - 0.4 * rise), (x1, y1)]
    return MplPath(vertices, [MplPath.MOVETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4])


def _draw_background(ax: Axes, graph: Any, positions: dict[str, tuple[float, float]]) -> None:
    """Alternate layer bands and a faint dot for every node of the graph."""
    for layer in range(0, graph.n_layers, 2):
        ax.axhspan(layer - 0.42, layer + 0.58, color="#F3F3F3", lw=0, zorder=0)
    xs, ys = zip(*positions.values(), strict=True)
    ax.scatter(xs, ys, s=5, color="#C8C8C8", lw=0, zorder=0.5)


def _draw_node(ax: Axes, kind: str, name: str, position: tuple[float, float]) -> None:
    """A labelled box for a node that an edge of the circuit starts or ends at."""
    face = "#FFFFFF"
    if kind in ("input", "logits"):
        face = "#D9D9D9"
    elif kind == "mlp":
        face = "#EDEDED"
    ax.text(
        *position,
        name,
        ha="center",
        va="center",
        fontsize=_FONT,
        zorder=3,
        bbox={"boxstyle": "round,pad=0.22", "facecolor": face, "edgecolor": "#333333", "linewidth": 0.6},
    )


def _decorate(ax: Axes, graph: Any, positions: dict[str, tuple[float, float]]) -> None:
    """Axis limits, layer numbers on the y axis, head numbers on the x axis, no frame."""
    ax.set_xlim(-0.7, graph.n_heads - 1 + _MLP_SHIFT + 1.0)
    ax.set_ylim(_INPUT_Y - 0.5, positions["logits"][1] + 0.5)
    ax.set_yticks(range(graph.n_layers))
    ax.set_yticklabels([str(layer) for layer in range(graph.n_layers)], fontsize=_FONT)
    ax.set_ylabel("layer (heads; MLP just above)", fontsize=_FONT + 1)
    ax.set_xticks([*range(graph.n_heads), graph.n_heads - 1 + _MLP_SHIFT])
    ax.set_xticklabels([f"h{h}" for h in range(graph.n_heads)] + ["MLP"], fontsize=_FONT)
    ax.tick_params(length=0, pad=2)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _legend_handles(signed: bool, grouped: bool) -> list[Line2D]:
    """Edge colours, then the sign and width convention (with scores) and the group marker (when drawn)."""
    names = {"q": "into query", "k": "into key", "v": "into value", "mlp": "into MLP / logits"}
    handles = [Line2D([], [], color=EDGE_COLORS[kind], lw=2, label=label) for kind, label in names.items()]
    if signed:
        handles += [
            Line2D([], [], color="#333333", lw=1.2, label="score > 0"),
            Line2D([], [], color="#333333", lw=1.2, ls=(0, (3.0, 1.6)), label="score < 0 (ablating lowers metric)"),
            Line2D([], [], color="none", label="width \u221d |score|"),
        ]
    if grouped:
        handles.append(
            Line2D([], [], color="#333333", marker="o", ms=2.2, lw=0.7, label="key/value head (shared by group)")
        )
    return handles


def _summary_title(circuit: Any, n_edges: int) -> str:
    """``task / method: N edges, M nodes`` (nodes as ``circuit.nodes`` counts them, when it has them)."""
    meta = getattr(circuit, "meta", None) or {}
    parts = [meta[key] for key in ("task", "method") if isinstance(meta.get(key), str)]
    nodes = getattr(circuit, "nodes", None)
    counts = f"{n_edges} edges" + (f", {len(nodes)} nodes" if nodes is not None else "")
    return f"{' / '.join(parts)}: {counts}" if parts else f"Circuit: {counts}"
