"""Node and edge names, counts and the dense index."""

from __future__ import annotations

import pytest
import torch

from circuits import Graph


def test_gpt2_small_shape_has_the_eap_ig_edge_count():
    graph = Graph(n_layers=12, n_heads=12)
    assert (graph.n_src, graph.n_dst, len(graph.edges)) == (157, 445, 32_491)


def test_smollm2_shape_has_70651_edges():
    graph = Graph(n_layers=30, n_heads=9, n_kv_heads=3)
    assert (graph.n_src, graph.n_dst, len(graph.edges)) == (301, 481, 70_651)


def test_pythia_70m_shape_with_parallel_blocks_has_3580_edges():
    assert len(Graph(n_layers=6, n_heads=8, parallel=True).edges) == 3_580


def test_len_equals_real_edge_count():
    graph = Graph(3, 4, 2)
    assert len(graph) == len(graph.edges) == int(graph.real.sum())


def test_gqa_has_key_value_destinations_per_kv_head():
    graph = Graph(n_layers=2, n_heads=6, n_kv_heads=2)
    assert [d for d in graph.destinations if d.startswith("a1.") and d.endswith("<k>")] == ["a1.h0<k>", "a1.h1<k>"]
    assert "a1.h2<v>" not in graph.destinations
    assert sum(d.endswith("<q>") for d in graph.destinations) == 12


def test_names_in_forward_order():
    graph = Graph(n_layers=2, n_heads=2)
    assert graph.sources == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert graph.destinations[:7] == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0"]
    assert graph.destinations[-1] == "logits"


def test_sequential_mlp_reads_its_own_layers_heads_but_parallel_does_not():
    assert "a1.h0->m1" in Graph(2, 2).edges
    parallel = Graph(2, 2, parallel=True)
    assert "a1.h0->m1" not in parallel.edges
    assert "m0->m1" in parallel.edges


def test_no_edge_runs_backwards_or_within_a_heads_own_layer():
    edges = set(Graph(2, 2).edges)
    assert "a1.h0->a1.h1<q>" not in edges
    assert "m1->a1.h0<q>" not in edges
    assert "m0->m0" not in edges
    assert "m0->a1.h1<k>" in edges


def test_index_and_edge_name_round_trip():
    graph = Graph(3, 4, 2)
    for name in graph.edges:
        assert graph.edge_name(*graph.index(name)) == name


def test_real_mask_is_a_boolean_source_by_destination_tensor():
    graph = Graph(2, 2)
    assert graph.real.dtype == torch.bool and graph.real.shape == (graph.n_src, graph.n_dst)
    assert graph.real[:, graph.destination_index("logits")].all()
    assert not graph.real[graph.source_index("m1"), graph.destination_index("m1")]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("a0.h0", "not of the form"),
        ("a9.h0->logits", "unknown source node 'a9.h0'"),
        ("input->a0.h7<q>", "unknown destination node 'a0.h7<q>'"),
        ("m1->a0.h0<q>", "does not exist"),
    ],
)
def test_bad_edge_names_get_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        Graph(2, 2).index(bad)


def test_edge_name_rejects_positions_that_are_not_edges():
    graph = Graph(2, 2)
    with pytest.raises(ValueError, match="not an edge"):
        graph.edge_name(graph.source_index("m1"), graph.destination_index("a0.h0<q>"))


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        Graph(2, 6, 4)
