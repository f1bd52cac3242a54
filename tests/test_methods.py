"""Discovery methods against independent oracles on tiny random models of every architecture."""

from __future__ import annotations

import importlib

import pytest
import torch
from oracle import Oracle

import circuits
from circuits.methods.common import Batch
from circuits.methods.gradient import _batch_scores
from circuits.task import metric_values
from circuits.testing import tiny_hf, tiny_pair

acdc_module = importlib.import_module("circuits.methods.acdc")  # the package exports the function under this name
GRADIENT_METHODS = [method for method in circuits.choices.METHODS if method != "exact"]


def make_task(batch=6, seq=8, seed=1, metric="logit_diff", same=False):
    clean, corrupted, mask = tiny_pair(batch=batch, seq=seq, seed=seed)
    lengths = mask.sum(1).tolist()
    clean_ids = [row[:n].tolist() for row, n in zip(clean, lengths, strict=True)]
    corrupted_ids = clean_ids if same else [row[:n].tolist() for row, n in zip(corrupted, lengths, strict=True)]
    answers = [int(row[0]) for row in clean]
    wrong = [(a + 7) % 60 + 1 for a in answers]
    return circuits.Task.from_token_ids("tiny", clean_ids, corrupted_ids, answers, wrong, metric=metric)


@pytest.fixture(scope="module")
def task():
    return make_task()


def oracle_effect(model, task, edge):
    """mean logit_diff with ``edge`` patched (hook oracle) minus the clean mean."""
    tokens = task.tokenize()
    oracle = Oracle(model.hf)
    ablation = oracle.source_output(edge.split("->")[0], tokens.corrupted_ids, tokens.attention_mask)
    rows = torch.arange(len(tokens))
    patched = oracle.patch_edge(edge, tokens.clean_ids, tokens.attention_mask, ablation)[rows, tokens.positions]
    with torch.no_grad():
        clean = model.hf(tokens.clean_ids, attention_mask=tokens.attention_mask).logits[rows, tokens.positions]
    return float((metric_values("logit_diff", patched, tokens) - metric_values("logit_diff", clean, tokens)).mean())


def test_exact_equals_the_hook_oracle(tiny, task):
    scores = circuits.attribute(tiny, task, "exact", batch_size=4, progress=False)
    graph = tiny.graph
    for edge in ["input->a0.h1<q>", "a0.h2->a1.h0<k>", "m0->a2.h0<v>", "a0.h1->m1", "input->m2", "a2.h3->logits"]:
        assert scores[edge] == pytest.approx(oracle_effect(tiny, task, edge), abs=1e-5), edge
    assert torch.isnan(scores.tensor[~graph.real]).all()


def test_exact_node_scores_ablate_every_outgoing_edge(task):
    model = circuits.Model.from_hf(tiny_hf("neox"))
    scores = circuits.attribute(model, task, "exact", level="node", progress=False)
    tokens = task.tokenize()
    patch = circuits.engine.patching_values(model, tokens.attention_mask, tokens.corrupted_ids, tokens.attention_mask)
    with torch.no_grad():
        clean = circuits.patched_forward(
            model, tokens.clean_ids, tokens.attention_mask, logit_positions=tokens.positions
        )
        for node in ["input", "a0.h2", "m1", "a2.h0"]:
            edge_mask = torch.ones(model.graph.n_src, model.graph.n_dst)
            edge_mask[model.graph.source_index(node)] = 0
            ablated = circuits.patched_forward(
                model, tokens.clean_ids, tokens.attention_mask, edge_mask, patch, logit_positions=tokens.positions
            )
            expected = metric_values("logit_diff", ablated.logits, tokens) - metric_values(
                "logit_diff", clean.logits, tokens
            )
            assert scores[node] == pytest.approx(float(expected.mean()), abs=1e-5), node


def test_gradient_node_scores_are_edge_row_sums(task):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    edges = circuits.attribute(model, task, "eap", progress=False)
    nodes = circuits.attribute(model, task, "eap", level="node", progress=False)
    assert torch.allclose(nodes.tensor, edges.tensor.nan_to_num().sum(1), atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "neox"])
def test_eap_converges_to_exact_as_the_corruption_shrinks(arch, task):
    """Patch with clean + eps (corrupted - clean): EAP's relative error falls about linearly in eps."""
    model = circuits.Model.from_hf(tiny_hf(arch).double())
    tokens = task.tokenize()
    ids, mask, positions = tokens.clean_ids, tokens.attention_mask, tokens.positions
    clean_out = circuits.engine.source_outputs(model, ids, mask)
    corrupted_out = circuits.engine.patching_values(model, mask, tokens.corrupted_ids, mask)
    graph = model.graph
    edges = [
        graph.index(e) for e in ["a0.h1->a1.h0<q>", "a0.h0->a2.h0<k>", "m0->m1", "a1.h2->logits", "input->a1.h0<v>"]
    ]
    errors = []
    for eps in (0.02, 0.01):
        patch = clean_out + eps * (corrupted_out - clean_out)
        batch = Batch(tokens, patch, len(tokens))
        eap = _batch_scores(model, task, batch, "eap", 1)
        cache = circuits.engine.PrefixCache(model, ids, mask, patch, positions)
        base = metric_values("logit_diff", cache.base_logits, tokens).sum() / len(tokens)
        exact, approx = [], []
        for i, j in edges:
            edge_mask = torch.ones(graph.n_src, graph.n_dst, dtype=torch.float64)
            edge_mask[i, j] = 0
            layer = graph.destination_layer(j)
            value = metric_values("logit_diff", cache.run(edge_mask, layer), tokens).sum() / len(tokens)
            exact.append(float(value - base))
            approx.append(float(eap[i, j]))
        exact, approx = torch.tensor(exact), torch.tensor(approx)
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert errors[0] < 0.5, errors
    assert 0.35 < errors[1] / errors[0] < 0.65, errors


def test_identical_clean_and_corrupted_give_zero_scores():
    model = circuits.Model.from_hf(tiny_hf("llama"))
    same = make_task(same=True)
    for method in [*GRADIENT_METHODS, "exact"]:
        scores = circuits.attribute(model, same, method, progress=False)
        assert scores.values().abs().max() < 1e-6, method


@pytest.mark.parametrize("ablation", ["patching", "mean"])
def test_eap_ig_mask_scores_sum_to_the_total_effect(ablation, task):
    """Integrated gradients over the edge mask are complete: they add up to metric(all ablated) - metric(clean).

    (Not with zero ablation: near m = 0 every input shrinks to zero and RMSNorm's gradient diverges.)
    """
    model = circuits.Model.from_hf(tiny_hf("qwen2"))
    scores = circuits.attribute(model, task, "eap-ig-mask", ablation=ablation, ig_steps=64, progress=False)
    empty = circuits.Circuit(model.graph, torch.zeros(model.graph.n_src, model.graph.n_dst, dtype=torch.bool))
    tokens = task.tokenize()
    batch = next(circuits.methods.common.batches(model, task, ablation, 64))
    with torch.no_grad():
        run = circuits.patched_forward
        clean = run(model, tokens.clean_ids, tokens.attention_mask, logit_positions=tokens.positions).logits
        ablated = run(
            model,
            tokens.clean_ids,
            tokens.attention_mask,
            empty.edge_mask(),
            batch.patch,
            logit_positions=tokens.positions,
        ).logits
    total = float((metric_values("logit_diff", ablated, tokens) - metric_values("logit_diff", clean, tokens)).mean())
    assert abs(float(scores.values().sum()) - total) < 1e-3 * float(scores.values().abs().sum())


def test_the_same_call_twice_gives_identical_scores(task):
    model = circuits.Model.from_hf(tiny_hf("mistral"))
    for method in ["eap-ig-inputs", "exact"]:
        first = circuits.attribute(model, task, method, progress=False)
        second = circuits.attribute(model, task, method, progress=False)
        assert torch.equal(first.tensor.nan_to_num(), second.tensor.nan_to_num()), method


def test_scores_do_not_depend_on_batch_size(task):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    whole = circuits.attribute(model, task, "eap-ig-inputs", batch_size=64, progress=False)
    pieces = circuits.attribute(model, task, "eap-ig-inputs", batch_size=4, progress=False)
    assert torch.allclose(whole.values(), pieces.values(), atol=1e-5)


def test_scores_carry_meta_and_a_frame(task):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    scores = circuits.attribute(model, task, "eap", ablation="mean", progress=False)
    assert {k: scores.meta[k] for k in ("method", "ablation", "task", "n")} == {
        "method": "eap",
        "ablation": "mean",
        "task": "tiny",
        "n": len(task),
    }
    frame = scores.to_frame()
    assert len(frame) == len(model.graph.edges) and list(frame.columns) == ["edge", "src", "dst", "qkv", "score"]
    row = frame.set_index("edge").loc["a0.h1->a1.h2<k>"]
    assert (row.src, row.dst, row.qkv) == ("a0.h1", "a1.h2<k>", "k") and row.score == scores["a0.h1->a1.h2<k>"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="magic"), "unknown method 'magic'"),
        (dict(ablation="resample"), "unknown ablation 'resample'"),
        (dict(ig_steps=0), "ig_steps must be a positive integer"),
        (dict(batch_size=-1), "batch_size must be a positive integer"),
        (dict(level="head"), "unknown level 'head'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message, task):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    with pytest.raises(ValueError, match=message):
        circuits.attribute(model, task, **{"method": "eap", **kwargs})


# --- ACDC -------------------------------------------------------------------------------------------


def naive_acdc(model, task, threshold, candidates=None):
    """ACDC as documented in circuits.methods.acdc, with a whole patched forward per step."""
    graph = model.graph
    tokens = task.tokenize()
    ids, mask, positions = tokens.clean_ids, tokens.attention_mask, tokens.positions
    patch = circuits.engine.patching_values(model, mask, tokens.corrupted_ids, mask)
    with torch.no_grad():
        clean = circuits.patched_forward(model, ids, mask, logit_positions=positions).logits

    def kl(kept):
        with torch.no_grad():
            logits = circuits.patched_forward(model, ids, mask, kept.float(), patch, logit_positions=positions).logits
        return float(metric_values("kl", logits, tokens, clean).sum()) / len(tokens)

    kept = graph.real.clone() if candidates is None else candidates.clone()
    current = kl(kept)
    order = [graph.n_dst - 1]
    for slots in reversed(graph.layers):
        order += [
            slots.mlp_destination,
            *reversed(range(slots.attention_destinations.start, slots.attention_destinations.stop)),
        ]
    for destination in order:
        fed = graph.feeds[destination]  # the head or MLP it feeds; every query head of a key/value head's group
        if fed.any() and not kept[fed].any():
            kept[:, destination] = False
            continue
        for source in reversed(kept[:, destination].nonzero().flatten().tolist()):
            kept[source, destination] = False
            value = kl(kept)
            if abs(value - current) <= threshold:
                current = value
            else:
                kept[source, destination] = True
    return kept


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_acdc_equals_naive_sequential_acdc(arch, task):
    model = circuits.Model.from_hf(tiny_hf(arch))
    circuit = circuits.acdc(model, task, threshold=0.02, progress=False)
    assert torch.equal(circuit.mask, naive_acdc(model, task, 0.02))
    assert 0 < len(circuit) < len(model.graph)
    assert circuit.meta["forward_equivalents"] < circuit.meta["forward_equivalents_without_prefix_reuse"]
    assert torch.equal(
        circuits.acdc(model, task, threshold=0.02, progress=False, reuse_prefix=False).mask, circuit.mask
    )


def test_acdc_with_candidates_equals_naive_acdc_on_them(task):
    model = circuits.Model.from_hf(tiny_hf("qwen2"))
    candidates = circuits.attribute(model, task, "eap", progress=False).top_edges(60)
    circuit = circuits.acdc(model, task, threshold=0.005, candidates=candidates, progress=False)
    mask = torch.zeros(model.graph.n_src, model.graph.n_dst, dtype=torch.bool)
    for edge in candidates:
        mask[model.graph.index(edge)] = True
    assert torch.equal(circuit.mask, naive_acdc(model, task, 0.005, mask))
    assert set(circuit.edges) <= set(candidates)


def test_acdc_reports_the_metric_of_the_circuit_it_returns(task):
    # grouped-query attention: a key/value input stays in play while any query head of its group sends an edge
    model = circuits.Model.from_hf(tiny_hf("qwen2"))
    circuit = circuits.acdc(model, task, threshold=0.2, metric="logit_diff", progress=False)
    assert circuit.meta["metric_value"] == pytest.approx(circuits.evaluate(model, task, circuit).circuit, abs=1e-4)


def test_acdc_threshold_zero_keeps_every_edge_with_an_effect_and_a_huge_one_keeps_none(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    everything = circuits.acdc(model, task, threshold=0.0, progress=False)
    assert len(everything) >= 0.9 * len(model.graph)
    assert len(circuits.acdc(model, task, threshold=1e9, progress=False)) == 0


def test_acdc_checkpoint_resumes_to_the_same_circuit_after_an_interruption(task, tmp_path, monkeypatch):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    uninterrupted = circuits.acdc(model, task, threshold=0.02, progress=False)
    path = tmp_path / "acdc.ckpt"
    original = acdc_module._Scorer.evaluate
    calls = {"n": 0}

    def interrupting(self, *args):
        calls["n"] += 1
        if calls["n"] == 120:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(acdc_module._Scorer, "evaluate", interrupting)
    with pytest.raises(KeyboardInterrupt):
        circuits.acdc(model, task, threshold=0.02, checkpoint=path, progress=False)
    monkeypatch.setattr(acdc_module._Scorer, "evaluate", original)
    assert path.exists()
    resumed = circuits.acdc(model, task, threshold=0.02, checkpoint=path, progress=False)
    assert torch.equal(resumed.mask, uninterrupted.mask)
    assert circuits.acdc(model, task, threshold=0.02, checkpoint=path, progress=False).edges == uninterrupted.edges


def test_acdc_checkpoint_of_another_run_is_refused(task, tmp_path):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    path = tmp_path / "acdc.ckpt"
    circuits.acdc(model, task, threshold=0.5, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="belongs to another run: threshold"):
        circuits.acdc(model, task, threshold=0.1, checkpoint=path, progress=False)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        circuits.acdc(model, task, threshold=0.5, checkpoint=path, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=-1), "threshold must be a number >= 0"),
        (dict(threshold=0.1, metric="accuracy"), "unknown metric 'accuracy'"),
        (dict(threshold=0.1, ablation="resample"), "unknown ablation 'resample'"),
        (dict(threshold=0.1, candidates=["a0.h0->a9.h0<q>"]), "unknown destination node 'a9.h0<q>'"),
        (dict(threshold=0.1, candidates=["m2->a0.h0<q>"]), "does not exist"),
    ],
)
def test_acdc_bad_arguments_are_rejected(kwargs, message, task):
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    with pytest.raises(ValueError, match=message):
        circuits.acdc(model, task, progress=False, **kwargs)


def test_exact_gives_the_same_scores_one_ablation_per_forward_or_many(task):
    model = circuits.Model.from_hf(tiny_hf("qwen3"))
    exact = importlib.import_module("circuits.methods.exact")
    for level in ("edge", "node"):
        many = exact.exact_scores(model, task, "patching", 64, level, False)
        one = exact.exact_scores(model, task, "patching", 64, level, False, max_tokens=1)
        assert torch.allclose(many, one, atol=1e-6), level
