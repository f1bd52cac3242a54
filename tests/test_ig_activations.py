"""``eap-ig-activations`` (EAP-IG over activations, one layer at a time: the EAP-IG library's and MIB's method)
against a naive per-layer implementation on plain hooks, and ``eap-ig-mask`` (integrated gradients over the
edge mask, the method this package called ``eap-ig-activations`` before) against its former definition.

The naive implementation shares no code with the engine: for every layer group (the input, a layer's heads, a
layer's MLP) and every step a = k / steps it runs the unmodified HF model with that group's module output
*replaced* by the constant ``patch + a (clean - patch)`` (the input as the first block's input, the heads as
the attention output projection's output plus its bias, the MLP as its output), reads the metric's gradient at
every destination's input through a zero probe, and contracts it with the clean deltas.
"""

from __future__ import annotations

import dataclasses
import gc
import re
from contextlib import ExitStack

import pytest
import torch
from oracle import Oracle, _module
from test_gradient import prefix_task  # pairs sharing a prefix, of different lengths

import circuits
from circuits.methods import gradient, ig_activations
from circuits.methods.common import batches
from circuits.task import metric_values
from circuits.testing import tiny_hf, tiny_pair

STEPS = 2  # a = 1/2, 1: a few runs per layer group keep the tests fast


@pytest.fixture(scope="module")
def task():
    return prefix_task()


# --- the naive per-layer implementation ------------------------------------------------------------------------


def naive_scores(model, task, ablation, steps=STEPS):
    graph, oracle, tokens = model.graph, Oracle(model.hf), task.tokenize()
    lay = oracle.lay
    assert lay.residual_multiplier == 1.0 and lay.attn_post_norm is None  # the families this file tests
    clean = oracle.source_outputs(graph.sources, tokens.clean_ids, tokens.attention_mask)
    if ablation == "patching":
        patch = oracle.source_outputs(graph.sources, tokens.corrupted_ids, tokens.attention_mask)
    elif ablation == "mean":
        weights = tokens.attention_mask[..., None].double()
        patch = {u: (out.double() * weights).sum((0, 1)) / weights.sum() for u, out in clean.items()}
    else:
        patch = {u: torch.zeros_like(out) for u, out in clean.items()}
    groups = [["input"]]
    for layer in range(graph.n_layers):
        groups += [[f"a{layer}.h{h}" for h in range(graph.n_heads)], [f"m{layer}"]]
    deltas = torch.stack([(clean[u].double() - patch[u]).flatten() for u in graph.sources])
    scores = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.float64)
    for group in groups:
        for k in range(1, steps + 1):
            alpha = k / steps
            held = {u: (patch[u] + alpha * (clean[u].double() - patch[u])).float() for u in group}
            grads = probe_gradients(model, oracle, tokens, group, held)
            grads = torch.stack([grads[v].flatten() for v in graph.destinations]).double()
            scores += deltas @ grads.T / (len(groups) * steps)  # d metric / d probe_v = - d metric / d in_v
    return scores.float().masked_fill(~graph.real, float("nan"))


def probe_gradients(model, oracle, tokens, group, held):
    """``d metric / d probe_v`` for every destination v, with ``group``'s module output replaced by ``held``."""
    graph, lay = model.graph, oracle.lay
    probes = {v: torch.zeros_like(held[group[0]], requires_grad=True) for v in graph.destinations}
    with ExitStack() as stack:
        if group == ["input"]:

            def embedded(module, args, kwargs):  # the first block's input stream
                if args:
                    return (held["input"], *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": held["input"]}

            hook = lay.layers[0].register_forward_pre_hook(embedded, with_kwargs=True)
        elif group[0].startswith("a"):
            out_proj = _module(lay.layers[int(group[0][1:].split(".")[0])], lay.out_proj)
            constant = sum(held[u] for u in group)
            if out_proj.bias is not None:
                constant = constant + out_proj.bias
            hook = out_proj.register_forward_hook(lambda m, args, out: constant.reshape(out.shape))
        else:
            mlp = _module(lay.layers[int(group[0][1:])], lay.mlp_out or lay.mlp)
            hook = mlp.register_forward_hook(
                lambda m, args, out: held[group[0]].reshape((out[0] if isinstance(out, tuple) else out).shape)
            )
        stack.callback(hook.remove)
        for v in graph.destinations:
            stack.enter_context(oracle._rewrite_destination(v, lambda v=v: probes[v]))
        rows = torch.arange(len(tokens))
        logits = model.hf(tokens.clean_ids, attention_mask=tokens.attention_mask).logits[rows, tokens.positions]
    value = metric_values("logit_diff", logits, tokens).mean()
    grads = torch.autograd.grad(value, [probes[v] for v in graph.destinations], allow_unused=True)
    return {v: torch.zeros_like(probes[v]) if g is None else g for v, g in zip(graph.destinations, grads, strict=True)}


def assert_close(got, expected, relative=1e-5):
    """Equal within ``relative`` of the largest score (float32 sums over B x T x D products in other orders)."""
    real = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(got), ~real)
    scale = float(expected[real].abs().max())
    assert scale > 1e-2  # scores that are not all (nearly) zero
    error = float((got[real] - expected[real]).abs().max())
    assert error <= relative * scale, (error, scale)


# --- eap-ig-activations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_scores_equal_a_naive_per_layer_implementation_on_hooks(arch, task):
    model = circuits.Model.from_hf(tiny_hf(arch))
    scores = circuits.attribute(model, task, "eap-ig-activations", batch_size=4, ig_steps=STEPS, progress=False)
    assert_close(scores.tensor, naive_scores(model, task, "patching"))


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_mean_and_zero_ablation_interpolate_from_the_ablation_values(ablation, task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    scores = circuits.attribute(
        model, task, "eap-ig-activations", ablation=ablation, batch_size=4, ig_steps=STEPS, progress=False
    )
    assert_close(scores.tensor, naive_scores(model, task, ablation))


def test_the_groups_are_the_input_then_each_layers_heads_then_its_mlp():
    graph = circuits.Model.from_hf(tiny_hf("llama")).graph
    names = [[graph.sources[i] for i in range(group.start, group.stop)] for group in ig_activations.layer_groups(graph)]
    expected = [["input"]]
    for layer in range(graph.n_layers):
        expected += [[f"a{layer}.h{h}" for h in range(graph.n_heads)], [f"m{layer}"]]
    assert names == expected


def test_every_example_runs_once_at_every_group_and_step_within_the_batch(task, monkeypatch):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    runs = []  # (rows, with gradients)

    def counted(model, input_ids, *args, **kwargs):
        runs.append((len(input_ids), kwargs.get("grad_hook") is not None))
        return circuits.engine.patched_forward(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(ig_activations, "patched_forward", counted)
    circuits.attribute(model, task, "eap-ig-activations", batch_size=4, ig_steps=STEPS, progress=False)
    groups = 2 * model.graph.n_layers + 1
    assert sum(rows for rows, grad in runs if grad) == groups * STEPS * len(task)
    assert sum(rows for rows, grad in runs if not grad) == len(task)  # one clean run per batch
    assert max(rows for rows, _ in runs) <= 4


def test_scores_do_not_depend_on_how_the_steps_are_stacked():
    """With 3 steps, batch 4 runs one example at all steps per run, batch 2 one example with its steps split."""
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    task = prefix_task(batch=4)
    scores = [
        circuits.attribute(model, task, "eap-ig-activations", batch_size=size, ig_steps=3, progress=False).tensor
        for size in (4, 2)
    ]
    assert_close(scores[1], scores[0], relative=1e-6)


def test_summing_the_gradients_over_the_groups_before_contracting_changes_no_score(task, monkeypatch):
    """Each example's gradients summed over every group's runs and contracted once, or contracted run by run."""
    model = circuits.Model.from_hf(tiny_hf("llama"))
    begin, decided, scores = ig_activations._GroupSums.begin, [], []
    for force in (None, False):

        def spied(self, *args, force=force):
            begin(self, *args)
            self.summing = self.summing if force is None else force
            if args[2] is None:  # a run's examples (not the clean run's, which records the deltas)
                decided.append(self.summing)

        monkeypatch.setattr(ig_activations._GroupSums, "begin", spied)
        decided.clear()
        scores.append(
            circuits.attribute(model, task, "eap-ig-activations", batch_size=4, ig_steps=STEPS, progress=False).tensor
        )
        if force is None:
            assert all(decided)  # these shapes sum: n_dst x 2 examples <= n_src x 4 examples
    assert decided and not any(decided)
    assert_close(scores[1], scores[0], relative=1e-6)


def test_the_positions_every_pair_shares_add_nothing(task):
    """Scores computed from the first differing position equal those over every position."""
    model = circuits.Model.from_hf(tiny_hf("llama"))
    batch = next(batches(model, task, "patching", 64))
    assert batch.start == 3
    from_start = gradient._batch_scores(model, task, batch, "eap-ig-activations", STEPS)
    whole = gradient._batch_scores(model, task, dataclasses.replace(batch, start=0), "eap-ig-activations", STEPS)
    assert_close(from_start, whole, relative=1e-6)


def test_a_batch_with_trimmed_ablation_values_is_refused(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    batch = next(batches(model, task, "patching", 64, trim=True))
    with pytest.raises(circuits.CircuitsError, match="eap-ig-activations needs the whole ablation values"):
        gradient._batch_scores(model, task, batch, "eap-ig-activations", STEPS)


def test_one_step_holds_every_group_at_its_clean_outputs_so_kl_is_refused():
    """At a = 1 every run is the clean run, where KL is at its minimum and every gradient is zero."""
    model = circuits.Model.from_hf(tiny_hf("llama"))
    kl = prefix_task(metric="kl")
    with pytest.raises(circuits.CircuitsError, match="'eap-ig-activations' takes its gradients at the clean run only"):
        circuits.attribute(model, kl, "eap-ig-activations", ig_steps=1, progress=False)
    scores = circuits.attribute(model, kl, "eap-ig-activations", ig_steps=2, progress=False)
    assert scores.tensor[model.graph.real].abs().max() > 1e-4


def test_the_scores_record_their_steps_and_are_not_the_mask_methods(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    layers = circuits.attribute(model, task, "eap-ig-activations", ig_steps=STEPS, progress=False)
    mask = circuits.attribute(model, task, "eap-ig-mask", ig_steps=STEPS, progress=False)
    assert layers.meta["method"] == "eap-ig-activations" and layers.meta["ig_steps"] == STEPS
    difference = (layers.tensor - mask.tensor)[model.graph.real].abs().max()
    assert difference > 0.05 * mask.tensor[model.graph.real].abs().max()


def test_a_progress_bar_counts_the_forward_backwards_of_each_batch(task, capsys):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    circuits.attribute(model, task, "eap-ig-activations", ig_steps=STEPS, progress=True)
    runs = gradient.stacked_runs(len(task), STEPS)  # the task is one batch: its examples and steps, stacked
    total = len(runs) * len(ig_activations.layer_groups(model.graph))
    shown = re.findall(r"layer groups:\s+\d+%\|[^|]*\| \d+/(\d+)", capsys.readouterr().err)
    assert shown and {int(t) for t in shown} == {total}
    circuits.attribute(model, task, "eap-ig-activations", ig_steps=STEPS, progress=False)
    assert "layer groups" not in capsys.readouterr().err


def test_a_batch_leaves_no_graph_for_the_garbage_collector(task):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    gc.collect()
    gc.disable()
    try:
        circuits.attribute(model, task, "eap-ig-activations", batch_size=4, ig_steps=2, progress=False)
        alive = [item for item in gc.get_objects() if type(item) is circuits.engine._Run]
    finally:
        gc.enable()
    assert not alive


# --- the engine's read for a mask constant along each source's row --------------------------------------------


def held_mlp_run(model, clean, mask, edge_mask, patch):
    """Logits and every destination's input gradient of one run with ``edge_mask``, and the bytes it saves."""
    grads, saved = {}, {}

    def pack(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = circuits.patched_forward(
            model, clean, mask, edge_mask, patch, grad_hook=lambda dsts, g: grads.__setitem__(dsts.start, g)
        ).logits
    logits[mask.bool()][:, 3].sum().backward()
    return logits.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_a_mask_constant_along_each_source_reads_one_stream_with_the_per_destination_gradients(arch):
    """A layer's MLP held (its row of the mask 0, the rest 1) gives the logits and gradients of the same mask
    requiring grad (one input per destination), and saves no more for backward than a run with no mask."""
    model = circuits.Model.from_hf(tiny_hf(arch))
    graph = model.graph
    clean, corrupted, mask = tiny_pair(batch=3, seq=7)
    patch = circuits.engine.source_outputs(model, corrupted, mask)
    edge_mask = torch.ones(graph.n_src, graph.n_dst)
    edge_mask[graph.layers[0].mlp_source] = 0
    logits, grads, saved = held_mlp_run(model, clean, mask, edge_mask, patch)
    expected_logits, expected_grads, _ = held_mlp_run(model, clean, mask, edge_mask.requires_grad_(True), patch)
    _, _, plain_saved = held_mlp_run(model, clean, mask, None, None)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * graph.n_layers + 1
    scale = max(float(grad.abs().max()) for grad in expected_grads.values())  # the held MLP's own input gets ~0
    for start, grad in expected_grads.items():
        assert torch.allclose(grads[start], grad, rtol=0, atol=1e-6 * scale), start
    assert saved < 1.1 * plain_saved


# --- eap-ig-mask: the former eap-ig-activations ---------------------------------------------------------------


FORMER = gradient.GradientMethod(  # the definition registered as "eap-ig-activations" before the rename
    lambda steps: [(1.0, (k + 0.5) / steps) for k in range(steps)], per_point=True, uses_steps=True
)


@pytest.mark.parametrize("ablation", ["patching", "mean"])
def test_eap_ig_mask_is_the_former_eap_ig_activations_bit_for_bit(ablation, task, monkeypatch):
    model = circuits.Model.from_hf(tiny_hf("qwen2"))
    monkeypatch.setitem(gradient.GRADIENT_METHODS, "former", FORMER)
    former = gradient.gradient_scores(model, task, "former", ablation, 4, STEPS, progress=False)
    renamed = circuits.attribute(model, task, "eap-ig-mask", ablation, batch_size=4, ig_steps=STEPS, progress=False)
    real = model.graph.real
    assert torch.equal(renamed.tensor[real], former[real])
    assert former[real].abs().max() > 1e-2


def test_a_checkpoint_of_the_former_eap_ig_activations_is_refused_not_resumed(task, tmp_path):
    """Before the rename the name meant the mask integral: its running sums must not be resumed as this method's."""
    model = circuits.Model.from_hf(tiny_hf("llama"))
    path = tmp_path / "scores.ckpt"
    former = {"method": "eap-ig-activations", "ablation": "patching", "batch_size": 4, "level": "edge", "ig_steps": 2}
    saved = circuits.resume.open_checkpoint(path, model, task, former)
    saved.save({"next": 1}, {"scores": torch.zeros(model.graph.n_src, model.graph.n_dst)})
    with pytest.raises(circuits.CircuitsError, match="per_layer"):
        circuits.attribute(model, task, "eap-ig-activations", batch_size=4, ig_steps=2, checkpoint=path, progress=False)
