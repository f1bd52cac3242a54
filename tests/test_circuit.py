"""Selection, pruning, circuit files and views, evaluation and comparisons."""

from __future__ import annotations

import json
import re

import networkx as nx
import pytest
import torch

import circuits
from circuits.circuit import prune
from circuits.evaluate import MIB_FRACTIONS, area
from circuits.testing import tiny_hf, tiny_pair


def circuit_of(graph, edges, scores=None):
    return circuits.Circuit.from_edges(graph, edges, scores=scores)


@pytest.fixture(scope="module")
def task():
    clean, corrupted, mask = tiny_pair(batch=6, seq=8, seed=2)
    lengths = mask.sum(1).tolist()
    rows = lambda ids: [r[:n].tolist() for r, n in zip(ids, lengths, strict=True)]  # noqa: E731
    return circuits.Task.from_token_ids("tiny", rows(clean), rows(corrupted), [3] * 6, [9] * 6)


# --- pruning and selection -----------------------------------------------------------------


def test_pruning_drops_edges_from_unreached_sources_and_into_dead_ends():
    graph = circuits.Graph(2, 2)
    kept = ["input->a0.h0<q>", "a0.h0->m1", "m1->logits"]
    dangling = ["a1.h1->m1", "input->a1.h0<q>"]  # a1.h1 is never reached; a1.h0 reaches nothing
    assert circuit_of(graph, kept + dangling).mask.sum() == 5
    assert circuits.Circuit(graph, prune(graph, circuit_of(graph, kept + dangling).mask)).edges == sorted(
        kept, key=lambda e: graph.index(e)
    )


def test_pruning_cascades_until_nothing_changes():
    graph = circuits.Graph(3, 1)
    # a1.h0 is reached only through a0.h0, which itself feeds nothing that reaches the logits but a1.h0,
    # and a1.h0 reaches nothing: both go
    edges = ["input->a0.h0<q>", "a0.h0->a1.h0<k>", "input->m2", "m2->logits"]
    assert circuits.Circuit(graph, prune(graph, circuit_of(graph, edges).mask)).edges == ["input->m2", "m2->logits"]


def test_pruning_follows_gqa_key_value_groups():
    graph = circuits.Graph(2, 4, 2)  # kv head 1 feeds query heads 2 and 3
    edges = ["input->a1.h1<v>", "a1.h3->logits"]
    assert set(circuits.Circuit(graph, prune(graph, circuit_of(graph, edges).mask)).edges) == set(edges)


def test_top_n_threshold_and_greedy_report_sizes_before_and_after_pruning():
    graph = circuits.Graph(2, 2)
    scores = circuits.Scores(graph, torch.randn(graph.n_src, graph.n_dst, generator=torch.Generator().manual_seed(0)))
    for circuit in (scores.top_n(10), scores.threshold(1.0), scores.greedy(10)):
        report = circuit.meta["selection"]
        assert report["edges_after_pruning"] == len(circuit) <= report["edges_before_pruning"]
        assert torch.equal(prune(graph, circuit.mask), circuit.mask)


def test_top_n_picks_the_largest_absolute_or_signed_scores():
    graph = circuits.Graph(1, 1)
    values = torch.zeros(graph.n_src, graph.n_dst)
    for edge, value in {"input->logits": -5.0, "m0->logits": 1.0, "a0.h0->logits": 2.0}.items():
        values[graph.index(edge)] = value
    scores = circuits.Scores(graph, values)
    assert circuits.circuit.top_n_mask(scores, 1)[graph.index("input->logits")]
    assert circuits.circuit.top_n_mask(scores, 1, absolute=False)[graph.index("a0.h0->logits")]


def two_path_scores(metric):
    # ablating input->logits lowers the metric; ablating the path through m0 raises it
    graph = circuits.Graph(1, 1)
    values = torch.zeros(graph.n_src, graph.n_dst)
    for edge, value in {"input->logits": -5.0, "input->m0": 4.0, "m0->logits": 3.0}.items():
        values[graph.index(edge)] = value
    return circuits.Scores(graph, values, meta={"metric": metric})


@pytest.mark.parametrize(("metric", "edges"), [("logit_diff", ["input->logits"]), ("prob_diff", ["input->logits"]),
                                               ("kl", ["input->m0", "m0->logits"]),
                                               ("l2", ["input->m0", "m0->logits"])])  # fmt: skip
def test_most_helpful_takes_the_edges_whose_ablation_hurts_the_metric_most(metric, edges):
    circuit = two_path_scores(metric).most_helpful(len(edges))
    assert circuit.edges == edges
    assert circuit.meta["selection"]["how"] == f"most_helpful({len(edges)})"


def test_most_helpful_keeps_the_original_signed_scores():
    scores = two_path_scores("kl")
    circuit = scores.most_helpful(2)
    assert torch.equal(circuit.scores.nan_to_num(), scores.tensor.nan_to_num())


def test_most_helpful_of_a_custom_metric_needs_its_declared_direction():
    scores = two_path_scores("custom")
    with pytest.raises(circuits.CircuitsError, match="higher_is_better"):
        scores.most_helpful(1)
    assert scores.most_helpful(1, higher_is_better=True).edges == ["input->logits"]
    assert scores.most_helpful(2, higher_is_better=False).edges == ["input->m0", "m0->logits"]


def test_a_custom_metric_declares_its_direction_on_the_task_and_attribute_carries_it(task):
    def answer_logit(logits, batch):
        return logits.gather(1, batch.answer_ids[:, :1]).squeeze(1)

    ids = task.token_ids
    declared = circuits.Task.from_token_ids(
        "declared", ids["clean_ids"], ids["corrupted_ids"], ids["answer_ids"], ids["wrong_answer_ids"],
        metric=answer_logit, higher_is_better=True,
    )  # fmt: skip
    model = circuits.Model.from_hf(tiny_hf("llama"))
    scores = circuits.attribute(model, declared, "eap", progress=False)
    assert scores.meta["higher_is_better"] is True
    assert torch.equal(scores.most_helpful(20).mask, scores.most_helpful(20, higher_is_better=True).mask)


def test_every_named_metric_knows_its_direction_and_a_contradiction_is_refused():
    assert set(circuits.task.HIGHER_IS_BETTER) == set(circuits.choices.METRICS)
    ids = [[1, 2, 3]]
    assert circuits.Task.from_token_ids("t", ids, ids, [4], [5], metric="kl").higher_is_better is False
    with pytest.raises(circuits.CircuitsError, match="contradicts"):
        circuits.Task.from_token_ids("t", ids, ids, [4], [5], metric="kl", higher_is_better=True)


def test_greedy_grows_backwards_from_the_logits():
    graph = circuits.Graph(2, 1)
    values = torch.zeros(graph.n_src, graph.n_dst)
    values[graph.index("input->a0.h0<q>")] = 100.0  # best overall, but not connected until a0.h0 is in
    values[graph.index("a0.h0->logits")] = 1.0
    values[graph.index("m1->logits")] = 2.0
    mask = circuits.circuit.greedy_mask(circuits.Scores(graph, values), 2)
    assert circuits.Circuit(graph, mask).edges == ["m1->logits", "a0.h0->logits"] or set(
        circuits.Circuit(graph, mask).edges
    ) == {"m1->logits", "a0.h0->logits"}
    mask = circuits.circuit.greedy_mask(circuits.Scores(graph, values), 3)
    assert mask[graph.index("input->a0.h0<q>")]


# --- files ------------------------------------------------------------------------------------


def test_json_round_trip_is_lossless(tmp_path):
    graph = circuits.Graph(3, 4, 2)
    scores = torch.randn(graph.n_src, graph.n_dst)
    circuit = circuits.Circuit(graph, torch.rand(graph.n_src, graph.n_dst) < 0.3, scores=scores, meta={"task": "x"})
    back = circuits.Circuit.load(circuit.save(tmp_path / "c.json"))
    assert back.edges == circuit.edges
    assert torch.equal(back.scores[graph.real], circuit.scores[graph.real])
    assert back.meta["task"] == "x" and "versions" in back.meta and "date" in back.meta


def test_mib_json_repeats_gqa_key_value_edges_per_query_head_and_loads_back(tmp_path):
    graph = circuits.Graph(2, 4, 2)
    circuit = circuit_of(graph, ["input->a1.h1<k>", "a0.h0->a1.h2<q>"], scores=torch.ones(graph.n_src, graph.n_dst))
    data = json.loads(circuit.to_mib_json(tmp_path / "mib.json").read_text())
    assert data["edges"]["input->a1.h2<k>"]["in_graph"] and data["edges"]["input->a1.h3<k>"]["in_graph"]
    assert "input->a1.h1<k>" not in data["edges"] or not data["edges"]["input->a1.h1<k>"]["in_graph"]
    assert set(circuits.Circuit.load(tmp_path / "mib.json").edges) == set(circuit.edges)


def test_mib_json_of_a_gqa_model_reads_every_query_heads_key_value_name_as_its_own_group(tmp_path):
    # kv head 0 in the circuit, kv head 1 not, with different scores: query head 1's name (a1.h1<k>)
    # belongs to kv head 0, though a1.h1<k> is also the grouped name of kv head 1
    graph = circuits.Graph(2, 4, 2)
    scores = torch.arange(graph.n_src * graph.n_dst, dtype=torch.float32).view(graph.n_src, graph.n_dst)
    circuit = circuit_of(graph, ["input->a1.h0<k>", "a1.h0->logits"], scores=scores)
    back = circuits.Circuit.load(circuit.to_mib_json(tmp_path / "mib.json"))
    assert back.edges == circuit.edges
    assert torch.equal(back.scores[graph.real], scores[graph.real])


def test_a_hand_written_eap_ig_file_for_a_gpt2_shaped_graph_loads(tmp_path):
    graph = circuits.Graph(12, 12)
    edges = {name: {"score": 0.0, "in_graph": False} for name in graph.edges}
    edges["a0.h1->a5.h3<v>"] = {"score": 0.5, "in_graph": True}
    edges["m11->logits"] = {"score": -1.25, "in_graph": True}
    nodes = {name: {"in_graph": False} for name in [*graph.sources, "logits"]}
    path = tmp_path / "eap_ig.json"
    cfg = {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 768}
    path.write_text(json.dumps({"cfg": cfg, "nodes": nodes, "edges": edges}))
    circuit = circuits.Circuit.load(path)
    assert circuit.edges == ["a0.h1->a5.h3<v>", "m11->logits"] and len(circuit.graph.edges) == 32_491
    assert circuit.scores[graph.index("m11->logits")] == -1.25


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"cfg": {"n_layers": 2, "n_heads": 2}, "edges": {"a0.h0->a9.h0<q>": {"in_graph": true}}}', "unknown edge"),
        ('{"cfg": {"n_layers": 2, "n_heads": 2}, "edges": {}, "nodes": {"a7.h0": {}}}', "unknown node 'a7.h0'"),
        ('{"cfg": {"n_layers": 2, "n_heads": 2}, "edges": {"m1->a0.h0<q>": {"in_graph": true}}}', "does not exist"),
        ('{"cfg": {"n_layers": 2, "n_heads": 2}, "edges": {"m0->logits": {"score": "big"}}}', "non-numeric score"),
        ('{"cfg": {"n_heads": 2}, "edges": {}}', "bad 'cfg'"),
        ('{"edges": {}}', "needs 'cfg' and 'edges'"),
        ('{"cfg": {"n_layers": 2, "n_heads": 2}, "edges": {"m0->lo', "not a valid circuit JSON file"),
    ],
)
def test_bad_circuit_files_get_one_line_value_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        circuits.Circuit.load(path)
    assert "\n" not in str(error.value)


def test_loading_against_a_mismatched_model_is_refused(tmp_path):
    circuit_of(circuits.Graph(2, 2), ["m0->logits"]).save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="is for a graph of"):
        circuits.Circuit.load(tmp_path / "c.json", model=circuits.Model.from_hf(tiny_hf("gpt2")))


def test_networkx_view_has_node_and_edge_attributes():
    graph = circuits.Graph(2, 4, 2)
    circuit = circuit_of(
        graph, ["input->a1.h1<k>", "a1.h2->m1", "m1->logits"], scores=torch.ones(graph.n_src, graph.n_dst)
    )
    digraph = circuit.to_networkx()
    assert isinstance(digraph, nx.DiGraph)
    assert digraph.nodes["a1.h2"] == {"layer": 1, "kind": "attn", "head": 2}
    assert digraph.nodes["logits"]["kind"] == "logits" and digraph.nodes["input"]["kind"] == "input"
    assert digraph.edges["input", "a1.h1<k>"] == {"score": 1.0, "qkv": "k", "internal": False}
    assert digraph.has_edge("a1.h1<k>", "a1.h2") and digraph.has_edge("a1.h1<k>", "a1.h3")  # the kv group
    assert nx.has_path(digraph, "input", "logits")


def test_graphml_parses_back(tmp_path):
    graph = circuits.Graph(2, 2)
    circuit = circuit_of(
        graph, ["input->a0.h0<q>", "a0.h0->logits"], scores=torch.full((graph.n_src, graph.n_dst), 0.5)
    )
    back = nx.read_graphml(circuit.to_graphml(tmp_path / "c.graphml"))
    assert set(back.nodes) == {"input", "a0.h0<q>", "a0.h0", "logits"}
    assert float(back.edges["a0.h0", "logits"]["score"]) == 0.5


def test_dot_has_one_edge_line_per_edge_with_qkv_colours():
    graph = circuits.Graph(2, 2)
    circuit = circuit_of(graph, ["input->a0.h0<q>", "input->a0.h1<k>", "a0.h0->m1", "m1->logits"])
    dot = circuit.to_dot()
    assert dot.startswith("digraph circuit {") and dot.rstrip().endswith("}")
    assert len(re.findall(r"->", dot)) == 4
    colours = set(re.findall(r'color="(#[0-9a-f]{6})"', dot))
    assert len(colours) == 3  # q, k, and the MLP/logits colour


def test_frame_lists_the_circuit_edges():
    graph = circuits.Graph(2, 2)
    frame = circuit_of(graph, ["input->a0.h0<q>", "m1->logits"]).to_frame()
    assert frame.edge.tolist() == ["input->a0.h0<q>", "m1->logits"]
    assert frame.qkv.iloc[0] == "q" and frame.qkv.isna().tolist() == [False, True]


# --- evaluation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ablation", ["patching", "mean", "zero"])
def test_full_circuit_is_faithful_and_empty_circuit_is_not(task, ablation):
    model = circuits.Model.from_hf(tiny_hf("qwen2"))
    full = circuits.Circuit(model.graph, model.graph.real.clone())
    empty = circuits.Circuit(model.graph, torch.zeros_like(model.graph.real))
    assert circuits.evaluate(model, task, full, ablation).faithfulness == pytest.approx(1, abs=1e-5)
    assert circuits.evaluate(model, task, empty, ablation).faithfulness == pytest.approx(0, abs=1e-5)


def test_evaluation_reports_metric_values_and_per_example_spread(task):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    circuit = circuits.attribute(model, task, "eap", progress=False).top_n(40)
    result = circuits.evaluate(model, task, circuit)
    assert list(result.per_example.columns) == ["full", "circuit", "empty", "correct"] and len(result.per_example) == 6
    assert result.circuit == pytest.approx(result.per_example.circuit.mean())
    assert result.faithfulness == pytest.approx((result.circuit - result.empty) / (result.full - result.empty))
    baseline = task.baseline(model)
    assert result.full == pytest.approx(baseline.clean, abs=1e-5) and result.empty == pytest.approx(
        baseline.corrupted, abs=1e-5
    )


def test_cpr_and_cmd_are_the_trapezoid_areas():
    fractions = [0.1, 0.5, 1.0]
    assert area(fractions, [0.0, 1.0, 1.0]) == pytest.approx(0.4 * 0.5 + 0.5 * 1.0)
    assert area(fractions, [abs(1 - f) for f in (0.0, 0.5, 1.0)]) == pytest.approx(0.4 * 0.75 + 0.5 * 0.25)


def test_faithfulness_curve_on_the_mib_grid(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    scores = circuits.attribute(model, task, "eap-ig-inputs", progress=False)
    curve = circuits.faithfulness_curve(model, task, scores)
    assert curve.frame.fraction.tolist() == list(MIB_FRACTIONS)
    assert curve.frame.faithfulness.iloc[-1] == pytest.approx(1, abs=1e-5)
    assert curve.cpr == pytest.approx(area(curve.frame.fraction, curve.frame.faithfulness))
    assert curve.cmd == pytest.approx(area(curve.frame.fraction, (1 - curve.frame.faithfulness_absolute).abs()))


def test_curves_select_by_the_metrics_direction_even_where_the_model_does_worse_than_the_empty_circuit():
    # The old rule compared the measured full and empty metric; with answers that the clean model
    # prefers *less* than the corrupted one, full < empty, and it flipped the sign. The one rule reads
    # the metric: logit_diff is higher-is-better, so the curve's signed circuits are most_helpful's.
    model = circuits.Model.from_hf(tiny_hf("llama"))
    clean, corrupted, mask = tiny_pair(batch=6, seq=8, seed=2)
    lengths = mask.sum(1).tolist()
    rows = lambda ids: [r[:n].tolist() for r, n in zip(ids, lengths, strict=True)]  # noqa: E731
    with torch.no_grad():
        positions = mask.sum(1) - 1
        last = torch.arange(6), positions
        corrupted_logits = model.hf(corrupted, attention_mask=mask).logits[last]
        shift = corrupted_logits - model.hf(clean, attention_mask=mask).logits[last]
    answers, wrong = shift.argmax(1).tolist(), shift.argmin(1).tolist()  # gains most / least when corrupted
    task = circuits.Task.from_token_ids("backwards", rows(clean), rows(corrupted), answers, wrong)
    evaluation = circuits.evaluate(model, task, circuits.Circuit(model.graph, model.graph.real))
    assert evaluation.full < evaluation.empty  # the case where the old rules disagreed
    scores = circuits.attribute(model, task, "eap", progress=False)
    curve = circuits.faithfulness_curve(model, task, scores, fractions=[0.05, 0.2])
    sizes = curve.frame.edges.tolist()
    expected = [scores.most_helpful(n) for n in sizes]
    assert any(not torch.equal(c.mask, scores.most_helpful(n, higher_is_better=False).mask)
               for c, n in zip(expected, sizes, strict=True))  # fmt: skip
    for circuit, value in zip(expected, curve.frame.faithfulness, strict=True):
        assert circuits.evaluate(model, task, circuit).faithfulness == pytest.approx(value, abs=1e-5)


def test_roc_auc_matches_a_hand_computation():
    graph = circuits.Graph(1, 1)  # 6 edges
    values = torch.zeros(graph.n_src, graph.n_dst)
    ranking = {"input->logits": 4.0, "a0.h0->logits": 3.0, "m0->logits": 2.0, "input->m0": 1.0, "a0.h0->m0": 0.5}
    for edge, value in ranking.items():
        values[graph.index(edge)] = value
    scores = circuits.Scores(graph, values)  # input->a0.h0<q|k|v> score 0
    # true: input->logits (rank 1st) and input->m0 (4th); 6 negatives... 2 positives, 6 negatives
    truth = ["input->logits", "input->m0"]
    # positive 4.0 beats all 6 negatives; 1.0 beats 0.5 and the three zeros: 4 of 6
    assert circuits.roc_auc(scores, truth) == pytest.approx((6 + 4) / (2 * 6))


def test_overlap_is_jaccard_on_edges_and_nodes():
    graph = circuits.Graph(2, 2)
    a = circuit_of(graph, ["input->m0", "m0->logits"])
    b = circuit_of(graph, ["input->m0", "m0->m1", "m1->logits"])
    assert circuits.overlap(a, b) == {"edges": pytest.approx(1 / 4), "nodes": pytest.approx(3 / 4)}
