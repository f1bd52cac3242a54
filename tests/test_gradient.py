"""Attribution patching against an independent hook-based oracle, and the memory-lean gradient path.

The oracle (built on ``tests/oracle.py``'s hooks, sharing no code with the engine) runs the plain HF model once
per gradient point with every destination's input rewritten as ``x - shift_v - z_v``: ``shift_v`` removes
``(1 - m)`` of every preceding source's delta (none at m = 1), and ``z_v`` is a zero tensor whose gradient is
minus the metric's gradient at that destination's input. Scores are then contracted naively.
"""

from __future__ import annotations

import dataclasses
import gc
from contextlib import ExitStack

import pytest
import torch
from oracle import Oracle

import circuits
from circuits.engine import unchanged_prefix
from circuits.methods.common import batches
from circuits.methods.gradient import _batch_scores, stacked_runs
from circuits.task import metric_values
from circuits.testing import ARCHITECTURES, tiny_hf, tiny_native, tiny_pair

ORACLE_POINTS = {  # (input interpolation a, every edge's mask value): the methods' definitions
    "eap": lambda steps: [(1.0, 1.0)],
    "eap-ig-inputs": lambda steps: [(k / steps, 1.0) for k in range(steps)],
    "eap-ig-mask": lambda steps: [(1.0, (k + 0.5) / steps) for k in range(steps)],
    "clean-corrupted": lambda steps: [(1.0, 1.0), (0.0, 1.0)],
}
METHODS = list(ORACLE_POINTS)
STEPS = 3


def prefix_task(prefix=3, batch=6, seq=9, seed=1, metric="logit_diff"):
    """Pairs that agree on their first ``prefix`` tokens (so that the gradient path can trim them)."""
    clean, corrupted, mask = tiny_pair(batch=batch, seq=seq, seed=seed)
    lengths = mask.sum(1).tolist()
    clean_ids = [row[:n].tolist() for row, n in zip(clean, lengths, strict=True)]
    corrupted_ids = [
        c[:prefix] + row[prefix:n].tolist() for c, row, n in zip(clean_ids, corrupted, lengths, strict=True)
    ]
    corrupted_ids[0][prefix] = (clean_ids[0][prefix] + 1) % 60  # the first pair differs exactly at ``prefix``
    answers = [int(row[0]) for row in clean]
    wrong = [(a + 7) % 60 + 1 for a in answers]
    return circuits.Task.from_token_ids("prefix", clean_ids, corrupted_ids, answers, wrong, metric=metric)


@pytest.fixture(scope="module")
def task():
    return prefix_task()


def oracle_scores(model, task, method, ablation, steps=STEPS):
    """Edge scores by hooks: one HF forward/backward per gradient point, every destination probed at once."""
    graph, oracle, tokens = model.graph, Oracle(model.hf), task.tokenize()
    ids, mask = tokens.clean_ids, tokens.attention_mask
    clean = oracle.source_outputs(graph.sources, ids, mask)
    if ablation == "patching":
        patch = oracle.source_outputs(graph.sources, tokens.corrupted_ids, mask)
    elif ablation == "mean":
        weights = mask[..., None].to(torch.float32)
        patch = {u: (out * weights).sum((0, 1)) / weights.sum() for u, out in clean.items()}
    else:
        patch = {u: torch.zeros_like(out) for u, out in clean.items()}
    points = ORACLE_POINTS[method](steps)
    scores = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.float64)
    for alpha, m in points:
        outputs, grads = oracle_point(model, oracle, tokens, clean, patch, alpha, m)
        outputs = clean if m == 1.0 else outputs  # eap-ig-mask: each point's own deltas
        deltas = torch.stack([(outputs[u] - patch[u]).flatten() for u in graph.sources]).double()
        grads = torch.stack([grads[v].flatten() for v in graph.destinations]).double()
        scores += deltas @ grads.T / len(points)  # d metric / d z_v = - d metric / d in_v
    return scores.float().masked_fill(~graph.real, float("nan"))


def oracle_point(model, oracle, tokens, clean, patch, alpha, m):
    """Every source's output and ``d metric / d z_v`` for every destination v at one gradient point."""
    graph, rows = model.graph, torch.arange(len(tokens))
    stores = {u: {} for u in graph.sources}
    probes = {v: torch.zeros_like(clean["input"], requires_grad=True) for v in graph.destinations}

    def shift(v):
        total = probes[v]
        for u in graph.sources:
            if m != 1.0 and graph.real[graph.source_index(u), graph.destination_index(v)]:
                total = total + (1 - m) * (stores[u]["out"] - patch[u])
        return total

    def interpolate(module, args, kwargs):
        x = patch["input"] + alpha * (clean["input"] - patch["input"])
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    with ExitStack() as stack:
        hook = oracle.lay.layers[0].register_forward_pre_hook(interpolate, with_kwargs=True)
        stack.callback(hook.remove)
        for u in graph.sources:
            stack.enter_context(oracle._capture_source(u, stores[u]))
        for v in graph.destinations:
            stack.enter_context(oracle._rewrite_destination(v, lambda v=v: shift(v)))
        logits = model.hf(tokens.clean_ids, attention_mask=tokens.attention_mask).logits[rows, tokens.positions]
    value = metric_values("logit_diff", logits, tokens).mean()
    grads = torch.autograd.grad(value, [probes[v] for v in graph.destinations])
    return {u: store["out"].detach() for u, store in stores.items()}, dict(zip(graph.destinations, grads, strict=True))


def assert_equal_scores(got, expected, tolerance=2e-5):
    """Equal within ``tolerance`` of the largest score: float32 sums over B x T x D products, in an order that
    differs between the engine, the oracle and runs (the matrix product's blocking follows memory alignment)."""
    real = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(got), ~real)
    atol = tolerance * max(1.0, float(expected[real].abs().max()))
    assert torch.allclose(got[real], expected[real], rtol=0, atol=atol), float((got[real] - expected[real]).abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradient_scores_equal_the_hook_oracle(arch, method, task):
    model = circuits.Model.from_hf(tiny_hf(arch))
    scores = circuits.attribute(model, task, method, batch_size=4, ig_steps=STEPS, progress=False)
    assert_equal_scores(scores.tensor, oracle_scores(model, task, method, "patching"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_gradient_scores_with_mean_and_zero_ablation_equal_the_hook_oracle(ablation, method, task):
    model = circuits.Model.from_hf(tiny_hf("qwen2"))
    scores = circuits.attribute(model, task, method, ablation=ablation, batch_size=4, ig_steps=STEPS, progress=False)
    assert_equal_scores(scores.tensor, oracle_scores(model, task, method, ablation), tolerance=1e-4)


def test_the_unchanged_prefix_is_where_the_batch_first_differs(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    tokens = task.tokenize()
    assert unchanged_prefix(model, tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask) == 3
    assert (
        unchanged_prefix(model, tokens.clean_ids, tokens.clean_ids, tokens.attention_mask)
        == tokens.clean_ids.shape[1] - 1
    )


def test_the_unchanged_prefix_ignores_padding():
    model = circuits.Model.from_hf(tiny_hf("llama"))
    clean = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    corrupted = torch.tensor([[5, 6, 7, 9], [5, 6, 9, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert unchanged_prefix(model, clean, corrupted, mask) == 2


def test_a_bidirectional_model_has_no_unchanged_prefix(task):
    model = circuits.Model.from_hf(tiny_native("native-bidirectional"))
    tokens = task.tokenize()
    assert unchanged_prefix(model, tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask) == 0


@pytest.mark.parametrize("name", ["native-bidirectional", "native-mlp-ln"])
@pytest.mark.parametrize("method", METHODS)
def test_trimming_positions_changes_no_score(name, method, task):
    """With patching, scores equal those of the computation over every position (a batch that starts at 0)."""
    model = circuits.Model.from_hf(tiny_native(name))
    trim = method != "eap-ig-mask"  # its interpolated forwards read the whole patch
    trimmed = _batch_scores(model, task, next(batches(model, task, "patching", 64, trim=trim)), method, STEPS)
    whole_batch = dataclasses.replace(next(batches(model, task, "patching", 64)), start=0)
    whole = _batch_scores(model, task, whole_batch, method, STEPS)
    assert torch.allclose(trimmed, whole, atol=1e-6)
    assert trimmed.abs().max() > 1e-3


def test_the_shared_stream_gives_each_destination_its_own_gradient():
    """Mask all ones (one stream per layer, no copies) and a mask requiring grad (one input per destination):
    the grad hook receives the same gradients."""
    model = circuits.Model.from_hf(tiny_hf("qwen3"))
    clean, _, mask = tiny_pair(batch=3, seq=7)
    hooked = []
    for edge_mask in (None, torch.ones(model.graph.n_src, model.graph.n_dst, requires_grad=True)):
        grads = {}
        logits = circuits.patched_forward(
            model, clean, mask, edge_mask, grad_hook=lambda dsts, g, grads=grads: grads.__setitem__(dsts.start, g)
        ).logits
        logits[mask.bool()][:, 3].sum().backward()
        hooked.append(grads)
    assert hooked[0].keys() == hooked[1].keys() and len(hooked[0]) == 2 * model.graph.n_layers + 1
    for start, grad in hooked[1].items():
        assert hooked[0][start].shape == grad.shape
        assert torch.allclose(hooked[0][start], grad, atol=1e-6 * float(grad.abs().max())), start


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs."""
    saved = {}

    def pack(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_the_forward_saves_no_per_destination_copies_for_backward(arch):
    """With a grad hook and the mask all ones, the engine saves about what the plain HF forward saves."""
    model = circuits.Model.from_hf(tiny_hf(arch))
    clean, _, mask = tiny_pair(batch=8, seq=16)
    embeddings = model.adapter.embed(clean, torch.arange(16).expand(8, 16)).detach().requires_grad_(True)
    rows = torch.zeros(8, dtype=torch.long)

    def ours():
        circuits.patched_forward(
            model, clean, mask, logit_positions=rows, grad_hook=lambda d, g: None, input_embeddings=embeddings
        )

    def plain():
        model.hf(inputs_embeds=embeddings, attention_mask=mask, logits_to_keep=1)

    assert saved_bytes(ours) < 1.1 * saved_bytes(plain)


def test_source_outputs_from_a_position_are_the_whole_outputs_from_there(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    tokens = task.tokenize()
    whole = circuits.engine.source_outputs(model, tokens.clean_ids, tokens.attention_mask)
    tail = circuits.engine.source_outputs(model, tokens.clean_ids, tokens.attention_mask, start=3)
    assert tail.shape[2] == whole.shape[2] - 3
    assert torch.equal(tail, whole[:, :, 3:])


def test_a_trimmed_batch_holds_the_corrupted_outputs_from_the_first_differing_position(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    trimmed = next(batches(model, task, "patching", 64, trim=True))
    whole = next(batches(model, task, "patching", 64))
    assert trimmed.trimmed and trimmed.start == whole.start == 3
    assert torch.equal(trimmed.patch, whole.patch[:, :, 3:])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_from_a_position_are_the_tail_of_the_whole_gradients(arch):
    model = circuits.Model.from_hf(tiny_hf(arch))
    clean, _, mask = tiny_pair(batch=3, seq=7)
    hooked = []
    for start in (0, 2):
        grads = {}
        embeddings = model.adapter.embed(clean, torch.arange(7).expand_as(clean)).detach().requires_grad_(True)
        logits = circuits.patched_forward(
            model,
            clean,
            mask,
            input_embeddings=embeddings,
            grad_hook=lambda dsts, g, grads=grads: grads.__setitem__(dsts.start, g),
            grad_from=start,
        ).logits
        (embedding_grad,) = torch.autograd.grad(logits[mask.bool()][:, 3].sum(), embeddings)
        hooked.append((grads, embedding_grad))
    (whole, whole_input), (tail, tail_input) = hooked
    assert whole.keys() == tail.keys()
    for first in whole:  # equal up to float32 rounding: the stream's gradient is summed in another order
        assert torch.allclose(tail[first], whole[first][:, :, 2:], rtol=0, atol=2e-6 * float(whole[first].abs().max()))
    assert torch.allclose(tail_input, whole_input, rtol=0, atol=2e-6 * float(whole_input.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_attribution_leaves_no_graph_for_the_garbage_collector(method, task):
    """A batch's graph, deltas and runs are freed when it ends, not when a cycle collection finds them."""
    model = circuits.Model.from_hf(tiny_hf("llama"))
    gc.collect()
    gc.disable()
    try:
        circuits.attribute(model, task, method, batch_size=4, ig_steps=STEPS, progress=False)
        alive = [item for item in gc.get_objects() if type(item) is circuits.engine._Run]
    finally:
        gc.enable()
    assert not alive


@pytest.mark.parametrize(
    ("n_examples", "n_points", "first"), [(6, 3, None), (7, 2, 0), (2, 5, None), (1, 2, 0), (5, 5, 4)]
)
def test_stacked_runs_take_every_example_at_every_point_once_within_the_batch(n_examples, n_points, first):
    runs = stacked_runs(n_examples, n_points, first)
    taken = [(e, k) for examples, points in runs for e in range(examples.start, examples.stop) for k in points]
    assert sorted(taken) == [(e, k) for e in range(n_examples) for k in range(n_points)]
    assert all((examples.stop - examples.start) * len(points) <= n_examples for examples, points in runs)
    if first is not None:  # the point that records an example's deltas comes in its first run
        for e in range(n_examples):
            assert next(points for examples, points in runs if examples.start <= e < examples.stop)[0] == first


@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
@pytest.mark.parametrize("method", ["eap-ig-inputs", "clean-corrupted"])
def test_scores_do_not_depend_on_how_the_points_are_stacked(method, metric):
    """Batch 1 runs one example per run (its points in groups), 2 and 6 several examples at all points."""
    model = circuits.Model.from_hf(tiny_hf("llama"))
    task = prefix_task(metric=metric)
    scores = [
        circuits.attribute(model, task, method, batch_size=size, ig_steps=STEPS, progress=False).tensor
        for size in (6, 2, 1)
    ]
    for other in scores[1:]:
        assert_equal_scores(other, scores[0], tolerance=1e-6)
    assert scores[0].nan_to_num().abs().max() > 1e-3


@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_no_forward_takes_more_rows_than_the_batch(method, batch_size, task, monkeypatch):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    rows = []

    def counted(model, input_ids, *args, **kwargs):
        rows.append(len(input_ids))
        return circuits.engine.patched_forward(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(circuits.methods.gradient, "patched_forward", counted)
    circuits.attribute(model, task, method, batch_size=batch_size, ig_steps=STEPS, progress=False)
    assert rows and max(rows) <= batch_size
