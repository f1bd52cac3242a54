"""Edges resolved by position: scores ``[n_src, n_dst, S]``, pruning by span, evaluation and export.

The gradient scores are checked against the hook oracle of tests/test_gradient.py contracted span by span, the
exact scores against ``Oracle.patch_edge(..., positions=...)``, and position-level EAP against exact patching to
first order; pruning by span against a naive fixed point over explicit (node, span) pairs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from oracle import Oracle
from test_gradient import ORACLE_POINTS, STEPS, assert_equal_scores, oracle_point
from test_learn import Interrupted

import circuits
from circuits.circuit import Circuit, prune
from circuits.errors import CircuitsError
from circuits.graph import Graph
from circuits.methods import exact
from circuits.methods.common import Resolution, batches, resolution_of
from circuits.methods.gradient import _batch_scores
from circuits.spans import Spans, layout
from circuits.task import Task, metric_values
from circuits.testing import tiny_hf, tiny_pair

ARCHS = ["llama", "gpt2", "neox", "gemma2"]
GRADIENT_METHODS = ["eap", "eap-ig-inputs", "eap-ig-mask", "clean-corrupted", "eap-ig-activations"]


def template_task(batch=6, seq=7, seed=1, spans=None):
    """Prompts of one length (one template): every position can be its own span."""
    clean, corrupted, _ = tiny_pair(batch=batch, seq=seq, seed=seed, lengths=[seq] * batch)
    answers = [int(row[0]) for row in clean]
    wrong = [(a + 7) % 60 + 1 for a in answers]
    return Task.from_token_ids("template", clean.tolist(), corrupted.tolist(), answers, wrong, spans=spans)


def spans_task(batch=6, seed=1):
    """Prompts of different lengths with named spans: A at position 1, B at 2..3, END at the last token."""
    clean, corrupted, mask = tiny_pair(batch=batch, seq=8, seed=seed)
    lengths = mask.sum(1).tolist()
    clean_ids = [row[:n].tolist() for row, n in zip(clean, lengths, strict=True)]
    corrupted_ids = [row[:n].tolist() for row, n in zip(corrupted, lengths, strict=True)]
    answers = [ids[0] for ids in clean_ids]
    wrong = [(a + 7) % 60 + 1 for a in answers]
    spans = [{"A": 1, "B": [2, 3], "END": -1} for _ in clean_ids]
    return Task.from_token_ids("spans", clean_ids, corrupted_ids, answers, wrong, spans=spans)


@pytest.fixture(scope="module")
def models():
    return {arch: circuits.Model.from_hf(tiny_hf(arch)) for arch in ARCHS}


# --- scores ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", GRADIENT_METHODS)
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_position_scores_sum_to_the_edge_scores(models, arch, method):
    model, task = models[arch], template_task()
    by_position = circuits.attribute(model, task, method, positions=True, ig_steps=STEPS, progress=False)
    edges = circuits.attribute(model, task, method, ig_steps=STEPS, progress=False)
    assert by_position.tensor.shape == (model.graph.n_src, model.graph.n_dst, 7)
    assert_equal_scores(by_position.tensor.sum(2), edges.tensor)


def test_declared_spans_give_one_score_per_span_and_rest(models):
    model, task = models["llama"], spans_task()
    scores = circuits.attribute(model, task, "eap", positions=True, progress=False)
    assert scores.spans.names == ("A", "B", "END", "rest")
    assert scores.tensor.shape[2] == 4
    edges = circuits.attribute(model, task, "eap", progress=False)
    assert_equal_scores(scores.tensor.sum(2), edges.tensor)


def oracle_position_scores(model, task, method, span_ids, n_spans, steps=STEPS):
    """``test_gradient``'s oracle contracted over each span's positions apart (patching ablation)."""
    graph, oracle, tokens = model.graph, Oracle(model.hf), task.tokenize()
    ids, mask = tokens.clean_ids, tokens.attention_mask
    clean = oracle.source_outputs(graph.sources, ids, mask)
    patch = oracle.source_outputs(graph.sources, tokens.corrupted_ids, mask)
    points = ORACLE_POINTS[method](steps)
    scores = torch.zeros(graph.n_src, graph.n_dst, n_spans, dtype=torch.float64)
    for alpha, m in points:
        outputs, grads = oracle_point(model, oracle, tokens, clean, patch, alpha, m)
        outputs = clean if m == 1.0 else outputs
        deltas = torch.stack([outputs[u] - patch[u] for u in graph.sources]).double()  # [n_src, B, T, D]
        grads = torch.stack([grads[v] for v in graph.destinations]).double()
        for span in range(n_spans):
            at = (span_ids == span)[None, :, :, None]
            scores[:, :, span] += (deltas * at).flatten(1) @ (grads * at).flatten(1).T / len(points)
    return scores.float().masked_fill(~graph.real[:, :, None], float("nan"))


@pytest.mark.parametrize("method", list(ORACLE_POINTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_position_gradient_scores_equal_the_hook_oracle(models, arch, method):
    model, task = models[arch], spans_task()
    scores = circuits.attribute(model, task, method, positions=True, batch_size=4, ig_steps=STEPS, progress=False)
    _, span_ids = layout(task.tokenize())
    assert_equal_scores(scores.tensor, oracle_position_scores(model, task, method, span_ids, len(scores.spans)))


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_position_scores_equal_the_hook_oracle(models, arch):
    model, task = models[arch], spans_task()
    scores = circuits.attribute(model, task, "exact", positions=True, progress=False)
    tokens = task.tokenize()
    oracle = Oracle(model.hf)
    ids, mask = tokens.clean_ids, tokens.attention_mask
    _, span_ids = layout(tokens)
    rows = torch.arange(len(tokens))
    with torch.no_grad():
        clean = metric_values("logit_diff", model.hf(ids, attention_mask=mask).logits[rows, tokens.positions], tokens)
    edges = ["input->a0.h1<k>", "a0.h0->m1", "m0->a1.h2<q>", "a1.h3->logits", "input->m0"]
    for edge, span in itertools.product(edges, range(len(scores.spans))):
        src = edge.split("->")[0]
        patch = oracle.source_output(src, tokens.corrupted_ids, mask)
        logits = oracle.patch_edge(edge, ids, mask, patch, positions=span_ids == span)[rows, tokens.positions]
        expected = float((metric_values("logit_diff", logits, tokens) - clean).mean())
        assert scores[f"{edge}@{scores.spans.names[span]}"] == pytest.approx(expected, abs=2e-5)


def first_order_gap(model, task, resolution, eps):
    """The largest difference between position-level EAP and exact patching, both divided by ``eps``, with the
    corrupted outputs moved ``eps`` of the way from the clean ones; and the largest exact effect / eps."""
    (batch,) = list(batches(model, task, "patching", 64))
    clean = circuits.engine.source_outputs(model, batch.tokens.clean_ids, batch.tokens.attention_mask)
    batch.patch = clean + eps * (batch.patch - clean)
    estimate = _batch_scores(model, task, batch, "eap", 1, resolution=resolution) / eps
    by_layer = {}
    for layer, unit in exact._units(model.graph, resolution, 0):
        by_layer.setdefault(layer, []).append(unit)
    shape = resolution.shape(model)
    effects = exact._batch_effects(shape, model, task, batch, by_layer, "edge", 10**6, False, resolution) / eps
    real = model.graph.real[:, :, None].expand(shape)
    return float((estimate[real] - effects[real]).abs().max()), float(effects[real].abs().max())


def test_position_eap_equals_exact_to_first_order():
    """exact / eps - EAP / eps shrinks like eps (the metric is summed in float32: eps stays >= 1e-3)."""
    model = circuits.Model.from_hf(tiny_hf("llama").double())
    task = spans_task()
    resolution = resolution_of(model, task, "edge", True)
    coarse, _ = first_order_gap(model, task, resolution, 1e-2)
    fine, scale = first_order_gap(model, task, resolution, 1e-3)
    assert scale > 0.1
    assert fine < 0.2 * coarse
    assert fine < 5e-3 * scale


# --- tasks and spans -------------------------------------------------------------------------------------------


def test_prompts_of_different_lengths_without_spans_are_an_error_naming_the_example(models):
    clean, corrupted, mask = tiny_pair(batch=4, seq=8, lengths=[8, 8, 6, 8])
    lengths = mask.sum(1).tolist()
    task = Task.from_token_ids(
        "ragged",
        [row[:n].tolist() for row, n in zip(clean, lengths, strict=True)],
        [row[:n].tolist() for row, n in zip(corrupted, lengths, strict=True)],
        [1, 2, 3, 4],
        [5, 6, 7, 8],
    )
    with pytest.raises(CircuitsError, match="example 2 is 6 tokens long.*declare named spans"):
        circuits.attribute(models["llama"], task, "eap", positions=True, progress=False)


def test_a_position_in_two_spans_is_an_error_naming_the_example():
    with pytest.raises(CircuitsError, match="example 1: token position 2 is in both span 'A' and 'B'"):
        template_task(batch=2, spans=[{"A": 1, "B": 2}, {"A": [1, 2], "B": 2}]).tokenize()


def test_examples_naming_different_spans_are_an_error():
    with pytest.raises(CircuitsError, match="example 1: names spans"):
        template_task(batch=2, spans=[{"A": 1}, {"B": 1}])


def test_positions_with_a_neuron_level_are_an_error(models):
    with pytest.raises(CircuitsError, match="positions resolve edges"):
        circuits.attribute(models["llama"], template_task(), "eap", level="neuron", positions=True, progress=False)


def test_readout_is_the_span_of_the_prediction_position():
    spans, _ = layout(spans_task().tokenize())
    assert spans.readout.tolist() == [False, False, True, False]


def test_reaches_follow_the_order_of_positions():
    spans, _ = layout(template_task(seq=4).tokenize())
    assert torch.equal(spans.reaches, torch.ones(4, 4, dtype=torch.bool).triu())


# --- pruning by span ------------------------------------------------------------------------------------------


def naive_prune(graph: Graph, mask: torch.Tensor, spans: Spans) -> torch.Tensor:
    """A fixed point over explicit (node, span) pairs: an edge (u, v, s) stays while u at s is reached from the
    input and v at s carries to a node (at s, or at every span a key/value at s reaches) that sends a kept edge
    into a destination that does the same, down to the logits at their spans."""
    n_spans = len(spans)
    kept = {tuple(index) for index in (mask & graph.real[:, :, None]).nonzero().tolist()}

    def carried_to(j: int, s: int) -> list[int]:
        kind = graph.destination_nodes[j].qkv
        return [b for b in range(n_spans) if spans.reaches[s, b]] if kind in ("k", "v") else [s]

    while True:
        reached = {(0, s) for s in range(n_spans)}
        changed = True
        while changed:
            changed = False
            for u, j, s in kept:
                if (u, s) in reached:
                    for w in graph.feeds[j].nonzero().flatten().tolist():
                        for b in carried_to(j, s):
                            if (w, b) not in reached:
                                reached.add((w, b))
                                changed = True
        useful = {(graph.n_dst - 1, s) for s in range(n_spans) if spans.readout[s]}
        changed = True
        while changed:
            changed = False
            sends = {(u, s) for u, j, s in kept if (j, s) in useful}
            for j in range(graph.n_dst - 1):
                for s in range(n_spans):
                    fed = graph.feeds[j].nonzero().flatten().tolist()
                    if (j, s) not in useful and any((w, b) in sends for w in fed for b in carried_to(j, s)):
                        useful.add((j, s))
                        changed = True
        pruned = {(u, j, s) for u, j, s in kept if (u, s) in reached and (j, s) in useful}
        if pruned == kept:
            break
        kept = pruned
    result = torch.zeros(mask.shape, dtype=torch.bool)
    for index in kept:
        result[index] = True
    return result


@pytest.mark.parametrize("shape", [(2, 2, 2, False), (3, 4, 2, False), (2, 2, 1, True)])
@pytest.mark.parametrize("seed", range(6))
def test_pruning_by_span_equals_a_naive_fixed_point(shape, seed):
    graph = Graph(*shape)
    generator = torch.Generator().manual_seed(seed)
    n_spans = 3
    reaches = torch.rand(n_spans, n_spans, generator=generator) < 0.6
    reaches |= torch.eye(n_spans, dtype=torch.bool)
    readout = torch.tensor([False, False, True])
    spans = Spans(("A", "B", "END"), reaches, readout)
    mask = torch.rand(graph.n_src, graph.n_dst, n_spans, generator=generator) < 0.3
    assert torch.equal(prune(graph, mask, spans), naive_prune(graph, mask, spans))


def test_a_key_edge_at_an_earlier_span_serves_a_head_read_at_a_later_span():
    graph = Graph(1, 1)
    spans = Spans(("S", "END"), torch.tensor([[True, True], [False, True]]), torch.tensor([False, True]))
    mask = torch.zeros(graph.n_src, graph.n_dst, 2, dtype=torch.bool)
    mask[graph.index("input->a0.h0<k>") + (0,)] = True  # the key at S
    mask[graph.index("a0.h0->logits") + (1,)] = True  # the head's output at END
    assert torch.equal(prune(graph, mask, spans), mask)
    mask[graph.index("a0.h0->logits") + (1,)] = False
    mask[graph.index("a0.h0->logits") + (0,)] = True  # at S, where the logits are not read
    assert not prune(graph, mask, spans).any()


def test_a_query_edge_serves_only_its_own_span():
    graph = Graph(1, 1)
    spans = Spans(("S", "END"), torch.tensor([[True, True], [False, True]]), torch.tensor([False, True]))
    mask = torch.zeros(graph.n_src, graph.n_dst, 2, dtype=torch.bool)
    mask[graph.index("input->a0.h0<q>") + (0,)] = True  # the query at S feeds the head at S only
    mask[graph.index("a0.h0->logits") + (1,)] = True
    assert not prune(graph, mask, spans).any()


# --- selection, evaluation, export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def position_scores(models):
    return circuits.attribute(models["llama"], spans_task(), "eap-ig-inputs", positions=True, progress=False)


def test_most_helpful_by_position_keeps_at_most_n_position_edges(position_scores):
    circuit = position_scores.most_helpful(25)
    assert 0 < len(circuit) <= 25
    assert circuit.mask.shape == position_scores.tensor.shape
    assert all("@" in edge for edge in circuit.edges)
    assert circuit.meta["selection"]["edges_before_pruning"] == 25


def test_evaluating_a_position_circuit_equals_the_masked_forward(models, position_scores):
    model, task = models["llama"], spans_task()
    circuit = position_scores.most_helpful(40)
    evaluation = circuits.evaluate(model, task, circuit)
    tokens = task.tokenize()
    _, span_ids = layout(tokens)
    patch = circuits.engine.source_outputs(model, tokens.corrupted_ids, tokens.attention_mask)
    with torch.no_grad():
        logits = circuits.engine.patched_forward(
            model,
            tokens.clean_ids,
            tokens.attention_mask,
            circuit.edge_mask(),
            patch,
            logit_positions=tokens.positions,
            spans=span_ids,
        ).logits
    assert evaluation.circuit == pytest.approx(float(metric_values("logit_diff", logits, tokens).mean()), abs=1e-5)


def test_every_position_edge_kept_is_faithful_and_none_is_not(models, position_scores):
    model, task = models["llama"], spans_task()
    everything = Circuit(model.graph, position_scores.real, level="edge", spans=position_scores.spans)
    nothing = Circuit(model.graph, ~position_scores.real, level="edge", spans=position_scores.spans)
    assert circuits.evaluate(model, task, everything).faithfulness == pytest.approx(1.0, abs=1e-5)
    assert circuits.evaluate(model, task, nothing).faithfulness == pytest.approx(0.0, abs=1e-5)


def test_a_faithfulness_curve_by_position_counts_position_edges(models, position_scores):
    curve = circuits.faithfulness_curve(models["llama"], spans_task(), position_scores, fractions=(0.01, 0.1, 1.0))
    assert curve.frame.edges.tolist()[-1] == len(model_edges := position_scores) == len(model_edges.values())
    assert curve.frame.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve.cpr == curve.cpr and curve.cmd == curve.cmd  # finite, not NaN


def test_a_position_circuit_on_a_task_with_other_spans_is_an_error(models, position_scores):
    circuit = position_scores.most_helpful(10)
    with pytest.raises(CircuitsError, match="resolved by spans A, B, END, rest"):
        circuits.evaluate(models["llama"], template_task(), circuit)


def test_a_position_circuit_file_round_trips(tmp_path, position_scores):
    circuit = position_scores.most_helpful(30)
    loaded = Circuit.load(circuit.save(tmp_path / "circuit.json"))
    assert loaded.spans == circuit.spans
    assert torch.equal(loaded.mask, circuit.mask)
    assert torch.allclose(loaded.scores.nan_to_num(), circuit.scores.nan_to_num())
    small = Circuit.load(circuit.save(tmp_path / "small.json", full=False))
    assert torch.equal(small.mask, circuit.mask)


def test_networkx_nodes_and_edges_carry_their_span(position_scores):
    circuit = position_scores.most_helpful(30)
    digraph = circuit.to_networkx()
    for _, data in digraph.nodes(data=True):
        assert data["span"] in circuit.spans.names
    spans = {data["span"] for _, _, data in digraph.edges(data=True) if not data["internal"]}
    assert spans == {edge.split("@")[1] for edge in circuit.edges}


def test_the_frame_names_each_edge_at_its_span(position_scores):
    frame = position_scores.to_frame()
    assert len(frame) == len(position_scores)
    assert list(frame.columns) == ["edge", "src", "dst", "span", "qkv", "score"]
    assert frame.edge.iloc[0] == f"{frame.src.iloc[0]}->{frame.dst.iloc[0]}@{frame.span.iloc[0]}"


def test_a_checkpoint_of_position_scores_is_not_resumed_as_edge_scores(models, tmp_path):
    model, task = models["llama"], template_task()
    path = tmp_path / "scores.ckpt"
    circuits.attribute(model, task, "eap", positions=True, checkpoint=path, progress=False)
    with pytest.raises(CircuitsError):
        circuits.attribute(model, task, "eap", checkpoint=path, progress=False)


def test_resolution_shape_by_span_counts_the_spans(models):
    resolution = resolution_of(models["llama"], spans_task(), "edge", True)
    graph = models["llama"].graph
    assert resolution.shape(models["llama"]) == (graph.n_src, graph.n_dst, 4)
    assert Resolution().shape(models["llama"]) == (graph.n_src, graph.n_dst)


def test_a_span_an_example_lacks_is_empty_there():
    tokens = template_task(batch=2, spans=[{"A": 1, "B": 2}, {"A": [], "B": 3}]).tokenize()
    spans, span_ids = layout(tokens)
    assert spans.names == ("A", "B", "rest")
    assert span_ids[1].tolist().count(0) == 0 and span_ids[1, 3] == 1


def test_the_position_figure_draws_every_circuit_edge_once_per_column_it_reaches(position_scores, tmp_path):
    circuit = position_scores.most_helpful(20)
    figure = circuit.plot(tmp_path / "circuit.svg")
    drawn = {patch.get_gid() for patch in figure.axes[0].patches} - {None}  # the layer bands have none
    assert drawn == set(circuit.edges)
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == list(circuit.spans.names)
    assert (tmp_path / "circuit.svg").read_text().count("<g id=") > len(drawn)


# --- ACDC by span -----------------------------------------------------------------------------------------------


def test_acdc_by_span_resumes_prefixes_exactly(models):
    """The prefix caches by span give the same search as whole forwards."""
    model, task = models["gpt2"], spans_task()
    options = {"positions": True, "progress": False, "batch_size": 4, "metric": "logit_diff"}
    fast = circuits.acdc(model, task, 0.05, **options)
    slow = circuits.acdc(model, task, 0.05, reuse_prefix=False, **options)
    assert torch.equal(fast.mask, slow.mask)
    assert fast.spans.names == ("A", "B", "END", "rest") and 0 < len(fast) < len(position_units(model, fast.spans))
    assert fast.meta["forward_equivalents"] < slow.meta["forward_equivalents"]


def position_units(model, spans):
    return model.graph.real[:, :, None].expand(-1, -1, len(spans)).nonzero()


def test_acdc_by_span_with_an_empty_span_finds_the_edge_level_circuit_at_the_rest(models):
    """A span no example has changes nothing: its edges go, and at ``rest`` (every position) ACDC by span makes
    the edge-level search's decisions."""
    model = models["llama"]
    plain = spans_task()
    task = circuits.Task.from_dict({**plain.to_dict(), "spans": [{"NONE": []}] * len(plain)})
    options = {"progress": False, "batch_size": 6, "metric": "logit_diff"}
    edges = circuits.acdc(model, plain, 0.05, **options)
    by_span = circuits.acdc(model, task, 0.05, positions=True, **options)
    assert by_span.spans.names == ("NONE", "rest")
    assert not by_span.mask[:, :, 0].any()
    assert torch.equal(by_span.mask[:, :, 1], edges.mask)


def test_acdc_by_span_takes_candidates_by_span(models, position_scores):
    pool = position_scores.most_helpful(40)
    found = circuits.acdc(
        models["llama"], spans_task(), 0.02, candidates=pool, positions=True, progress=False, metric="logit_diff"
    )
    assert not (found.mask & ~pool.mask).any()
    assert found.meta["candidates"] == len(pool)


# --- mask learning by span ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["edge-pruning", "ugs"])
def test_a_mask_learned_by_span_is_a_circuit_of_edges_at_spans(models, method):
    model, task = models["llama"], spans_task()
    options = {"target_edges": 600, "steps": 4, "batch_size": 3, "seed": 1, "progress": False, "positions": True}
    found = circuits.learn_circuit(model, task, method, **options)
    again = circuits.learn_circuit(model, task, method, **options)
    assert found.spans.names == ("A", "B", "END", "rest")
    assert 0 < len(found) <= 600 and torch.equal(found.mask, again.mask)
    assert found.scores.shape == (model.graph.n_src, model.graph.n_dst, 4)
    assert found.meta["spans"]["names"] == list(found.spans.names)


def test_a_mask_learned_by_span_resumes_to_the_uninterrupted_result(models, tmp_path, monkeypatch):
    from circuits.methods import learn

    monkeypatch.setattr(learn, "SAVE_SECONDS", 0.0)
    model, task = models["llama"], spans_task()
    options = {"target_edges": 600, "steps": 5, "batch_size": 3, "seed": 2, "progress": False, "positions": True}
    whole = circuits.learn_circuit(model, task, "edge-pruning", **options)
    path, feed = tmp_path / "learn.ckpt", learn._Feed.__call__

    def interrupt_at_step_3(self, step):
        if step == 3:
            raise Interrupted
        return feed(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(learn._Feed, "__call__", interrupt_at_step_3)
        with pytest.raises(Interrupted):
            circuits.learn_circuit(model, task, "edge-pruning", checkpoint=path, **options)
    resumed = circuits.learn_circuit(model, task, "edge-pruning", checkpoint=path, **options)
    assert torch.equal(resumed.mask, whole.mask)
    assert torch.equal(resumed.scores.nan_to_num(), whole.scores.nan_to_num())
    with pytest.raises(CircuitsError):  # the same file for the run by edge: another run's checkpoint
        circuits.learn_circuit(model, task, "edge-pruning", checkpoint=path, **{**options, "positions": False})


def test_learned_scores_by_span_rank_edges_at_spans_for_the_curve(models):
    from circuits.methods.learn import learned_scores

    model, task = models["llama"], spans_task()
    found = circuits.learn_circuit(
        model, task, "ugs", target_edges=30, steps=2, batch_size=3, progress=False, positions=True
    )
    scores = learned_scores(found, task)
    assert scores.spans == found.spans and len(scores) == len(position_units(model, found.spans))
    curve = circuits.faithfulness_curve(model, task, scores, fractions=(0.05, 1.0))
    assert curve.frame.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-5)
