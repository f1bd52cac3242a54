"""Figures: circuit drawings and faithfulness curves, saved atomically."""

from __future__ import annotations

import time
import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import PathPatch

import circuits
from circuits.plot import EDGE_COLORS, edge_kind, plot_circuit, plot_curves

EDGES = {  # edge -> score; a grouped-query graph: 4 query heads, 2 key/value heads
    "input->a0.h1<q>": 0.5,
    "a0.h1->a1.h3<q>": -2.0,
    "a0.h1->a1.h1<k>": 1.0,
    "m0->a1.h0<v>": -0.25,
    "a0.h2->m0": 0.1,
    "a1.h3->logits": 4.0,
}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def graph() -> circuits.Graph:
    return circuits.Graph(2, 4, 2)


def make_circuit(graph: circuits.Graph, edges: dict[str, float] = EDGES, scored: bool = True) -> circuits.Circuit:
    scores = torch.full((graph.n_src, graph.n_dst), float("nan"))
    for edge, score in edges.items():
        scores[graph.index(edge)] = score
    return circuits.Circuit.from_edges(graph, list(edges), scores=scores if scored else None)


def edge_patches(fig: Figure) -> dict[str, PathPatch]:
    return {p.get_gid(): p for ax in fig.axes for p in ax.patches if isinstance(p, PathPatch) and p.get_gid()}


def curve(label: str, fractions: list[float], faithfulness: list[float], cpr: float, cmd: float):
    frame = pd.DataFrame(
        {"fraction": fractions, "edges": [round(f * 1000) for f in fractions], "faithfulness": faithfulness}
    )
    return types.SimpleNamespace(frame=frame, cpr=cpr, cmd=cmd, label=label)


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-"), (".svg", b"<?xml")])
def test_plot_circuit_saves_each_format(graph, tmp_path, suffix, magic):
    path = tmp_path / f"circuit{suffix}"
    fig = plot_circuit(make_circuit(graph), path)
    assert isinstance(fig, Figure)
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_the_same_circuit_gives_the_same_file_bytes_on_every_save(graph, tmp_path, suffix):
    first, second = tmp_path / f"first{suffix}", tmp_path / f"second{suffix}"
    plot_circuit(make_circuit(graph), first)
    time.sleep(1.1)  # a creation date in the file would differ by now
    plot_circuit(make_circuit(graph), second)
    assert first.read_bytes() == second.read_bytes()


def test_svg_output_names_each_edge(graph, tmp_path):
    plot_circuit(make_circuit(graph), tmp_path / "c.svg")
    text = (tmp_path / "c.svg").read_text()
    assert 'id="a0.h1-&gt;a1.h3&lt;q&gt;"' in text


def test_saving_leaves_no_pyplot_figure_open(graph, tmp_path):
    for n in range(3):
        plot_circuit(make_circuit(graph), tmp_path / f"c{n}.png")
    plot_curves(curve("x", [0.01, 1.0], [0.5, 1.0], 0.7, 0.3), path=tmp_path / "curves.png")
    assert plt.get_fignums() == []


def test_plot_circuit_without_target_returns_pyplot_figure(graph):
    fig = plot_circuit(make_circuit(graph))
    assert plt.get_fignums() == [fig.number]


def test_plot_circuit_draws_into_given_axes(graph):
    fig, (left, right) = plt.subplots(1, 2)
    assert plot_circuit(make_circuit(graph), right) is fig
    assert not left.patches
    assert set(edge_patches(fig)) == set(EDGES)


def test_edges_get_one_colour_per_kind_of_destination(graph):
    colours = {edge: to_hex(p.get_edgecolor()) for edge, p in edge_patches(plot_circuit(make_circuit(graph))).items()}
    kinds = {edge_kind(graph, edge.split("->")[1]) for edge in EDGES}
    assert kinds == {"q", "k", "v", "mlp"}
    for edge, colour in colours.items():
        assert colour == to_hex(EDGE_COLORS[edge_kind(graph, edge.split("->")[1])]), edge
    assert len({to_hex(EDGE_COLORS[k]) for k in kinds}) == 4


def test_negative_scores_are_dashed(graph):
    patches = edge_patches(plot_circuit(make_circuit(graph)))
    for edge, score in EDGES.items():
        assert (patches[edge].get_linestyle() not in ("-", "solid")) == (score < 0), edge


def test_width_grows_with_absolute_score(graph):
    patches = edge_patches(plot_circuit(make_circuit(graph), max_width_edges=5.0))
    widths = {edge: patches[edge].get_linewidth() for edge in EDGES}
    assert widths["a1.h3->logits"] == pytest.approx(5.0)  # the largest |score|
    assert widths["a0.h1->a1.h3<q>"] > widths["a0.h1->a1.h1<k>"] > widths["input->a0.h1<q>"] > widths["a0.h2->m0"]


def test_unscored_circuit_has_uniform_solid_edges(graph):
    patches = edge_patches(plot_circuit(make_circuit(graph, scored=False)))
    assert len({p.get_linewidth() for p in patches.values()}) == 1
    assert all(p.get_linestyle() in ("-", "solid") for p in patches.values())


def test_key_value_edges_end_at_their_group_marker(graph):
    patches = edge_patches(plot_circuit(make_circuit(graph)))
    x_k, y_k = patches["a0.h1->a1.h1<k>"].get_path().vertices[-1]
    x_v, _ = patches["m0->a1.h0<v>"].get_path().vertices[-1]
    x_q, y_q = patches["a0.h1->a1.h3<q>"].get_path().vertices[-1]
    assert x_k == pytest.approx(2.5)  # key/value head 1 serves query heads 2 and 3
    assert x_v == pytest.approx(0.5)  # key/value head 0 serves query heads 0 and 1
    assert (x_q, y_q) == pytest.approx((3.0, 1.0))  # a query edge ends at its head
    assert y_k < y_q


def test_without_grouping_key_edges_end_at_the_head():
    graph = circuits.Graph(2, 3)
    patches = edge_patches(plot_circuit(make_circuit(graph, {"a0.h0->a1.h2<k>": 1.0})))
    assert tuple(patches["a0.h0->a1.h2<k>"].get_path().vertices[-1]) == pytest.approx((2.0, 1.0))


def test_only_nodes_of_the_circuit_are_labelled(graph):
    fig = plot_circuit(make_circuit(graph), title="")
    labels = {t.get_text() for t in fig.axes[0].texts}
    # a1.h0<v> is key/value head 0: its edge ends at a group marker, so no head a1.h0 is drawn
    assert labels == {"input", "a0.h1", "a1.h3", "m0", "a0.h2", "logits"}


def test_legend_names_the_colours_and_sign_convention(graph):
    legend = plot_circuit(make_circuit(graph)).axes[0].get_legend()
    text = " ".join(t.get_text() for t in legend.get_texts())
    for word in ("query", "key", "value", "MLP", "score < 0", "score > 0"):
        assert word in text


def test_default_title_counts_edges_and_names_task(graph):
    circuit = make_circuit(graph)
    circuit.meta.update(task="ioi", method="eap")
    assert plot_circuit(circuit).axes[0].get_title() == f"ioi / eap: {len(EDGES)} edges, {len(circuit.nodes)} nodes"
    assert plot_circuit(circuit, title="mine").axes[0].get_title() == "mine"


def test_empty_circuit_draws(graph):
    empty = circuits.Circuit(graph, torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool))
    assert edge_patches(plot_circuit(empty)) == {}


def test_unknown_extension_is_refused_before_writing(graph, tmp_path):
    existing = tmp_path / "circuit.jpg"
    existing.write_bytes(b"old")
    with pytest.raises(ValueError, match=r"\.jpg"):
        plot_circuit(make_circuit(graph), existing)
    with pytest.raises(ValueError, match="no extension"):
        plot_curves(curve("x", [1.0], [1.0], 1.0, 0.0), path=tmp_path / "curves")
    assert existing.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["circuit.jpg"]
    assert plt.get_fignums() == []


def test_failed_save_keeps_existing_file(graph, tmp_path, monkeypatch):
    existing = tmp_path / "circuit.png"
    existing.write_bytes(b"old")

    def fail(self, stream, **kwargs):
        stream.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_circuit(make_circuit(graph), existing)
    assert existing.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["circuit.png"]


def test_plot_curves_legend_shows_cpr_and_cmd_of_each_curve():
    curves = [
        curve("EAP", [0.001, 0.01, 0.1, 1.0], [0.1, 0.5, 0.9, 1.0], 0.734, 0.121),
        curve("ACDC", [0.001, 0.01, 0.1, 1.0], [0.0, 0.2, 0.8, 1.0], 0.5, 0.4),
    ]
    legend = plot_curves(curves, title="ioi").axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["EAP (CPR 0.73, CMD 0.12)", "ACDC (CPR 0.50, CMD 0.40)"]


def test_plot_curves_x_is_percent_of_edges_on_a_log_axis():
    fig = plot_curves(curve("EAP", [0.5, 0.0, 0.002, 1.0], [0.9, -0.1, 0.2, 1.0], 0.7, 0.2))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith("EAP")]
    assert np.allclose(line.get_xdata(), [0.2, 50.0, 100.0])  # sorted; 0 % cannot sit on a log axis
    assert {tuple(line.get_ydata()) for line in ax.get_lines()} >= {(0.0, 0.0), (1.0, 1.0)}  # reference lines


def test_plot_curves_draws_into_axes_and_saves(tmp_path):
    fig, ax = plt.subplots()
    path = tmp_path / "curves.pdf"
    assert plot_curves(curve("EAP", [0.01, 1.0], [0.5, 1.0], 0.7, 0.3), ax=ax, path=path) is fig
    assert path.read_bytes().startswith(b"%PDF-")


def test_two_hundred_edges_on_a_smollm2_shaped_graph(tmp_path):
    graph = circuits.Graph(30, 9, 3)
    generator = torch.Generator().manual_seed(0)
    real = graph.real.nonzero()
    chosen = real[torch.randperm(len(real), generator=generator)[:200]]
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    mask[chosen[:, 0], chosen[:, 1]] = True
    circuit = circuits.Circuit(graph, mask, scores=torch.randn(graph.n_src, graph.n_dst, generator=generator))
    fig = plot_circuit(circuit, tmp_path / "circuit.png")
    assert len(edge_patches(fig)) == 200
    assert (tmp_path / "circuit.png").stat().st_size > 10_000
