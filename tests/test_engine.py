"""The patched forward against the unmodified HF model and the hook-based oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import Oracle

import circuits
from circuits.engine import check_batch
from circuits.testing import tiny_hf as make_hf
from circuits.testing import tiny_pair as make_pair

ATOL = 1e-4


def real_positions(logits, mask):
    return logits[mask.bool()]


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model.hf(ids, attention_mask=mask).logits


def run(model, ids, mask, edge_mask=None, patch=None, **kwargs):
    with torch.no_grad():
        return circuits.patched_forward(model, ids, mask, edge_mask, patch, **kwargs).logits


def ones(model):
    return torch.ones(model.graph.n_src, model.graph.n_dst)


def test_full_mask_reproduces_hf_logits(tiny, pair):
    clean, _, mask = pair
    expected = hf_logits(tiny, clean, mask)
    for edge_mask in (None, ones(tiny)):
        got = run(tiny, clean, mask, edge_mask, keep_outputs=True)
        assert torch.allclose(real_positions(got, mask), real_positions(expected, mask), atol=ATOL)


def test_full_mask_requiring_grad_reproduces_hf_logits(tiny, pair):
    """A mask that requires grad takes the per-destination path even when it is all ones."""
    clean, _, mask = pair
    got = circuits.patched_forward(tiny, clean, mask, ones(tiny).requires_grad_(True)).logits
    assert got.requires_grad
    assert torch.allclose(
        real_positions(got.detach(), mask), real_positions(hf_logits(tiny, clean, mask), mask), atol=ATOL
    )


def test_empty_mask_with_patching_reproduces_corrupted_logits(tiny, pair):
    clean, corrupted, mask = pair
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    got = run(tiny, clean, mask, torch.zeros(tiny.graph.n_src, tiny.graph.n_dst), patch)
    expected = hf_logits(tiny, corrupted, mask)
    assert torch.allclose(real_positions(got, mask), real_positions(expected, mask), atol=ATOL)
    assert not torch.allclose(real_positions(got, mask), real_positions(hf_logits(tiny, clean, mask), mask), atol=ATOL)


def edges_to_check(graph):
    """Edges into every kind of destination, from every kind of source."""
    last = graph.n_layers - 1
    return [
        "input->a0.h1<q>",
        "input->a0.h0<k>",
        "input->a0.h0<v>",
        "a0.h2->a1.h3<q>",
        f"a0.h1->a1.h{graph.n_kv_heads - 1}<k>",
        "m0->a1.h0<v>",
        "a0.h0->m1",
        "input->m0",
        f"m{last - 1}->m{last}",
        f"a{last}.h1->logits",
        f"m{last}->logits",
        "input->logits",
    ]


def test_single_edge_patch_equals_hook_oracle(tiny, pair):
    clean, corrupted, mask = pair
    oracle = Oracle(tiny.hf)
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    clean_logits = hf_logits(tiny, clean, mask)
    for edge in edges_to_check(tiny.graph):
        src, _ = edge.split("->")
        edge_mask = ones(tiny)
        edge_mask[tiny.graph.index(edge)] = 0
        got = run(tiny, clean, mask, edge_mask, patch)
        expected = oracle.patch_edge(edge, clean, mask, oracle.source_output(src, corrupted, mask))
        assert (expected - clean_logits)[mask.bool()].abs().max() > 1e-3, f"{edge}: the patch changes nothing"
        assert torch.allclose(real_positions(got, mask), real_positions(expected, mask), atol=ATOL), edge


def test_fractional_mask_and_zero_ablation_equal_oracle(tiny, pair):
    clean, _, mask = pair
    oracle = Oracle(tiny.hf)
    for edge in ("a0.h1->a1.h0<k>", "input->m0", "a1.h0->logits"):
        edge_mask = ones(tiny)
        edge_mask[tiny.graph.index(edge)] = 0.3
        got = run(tiny, clean, mask, edge_mask, None)
        expected = oracle.patch_edge(edge, clean, mask, None, weight=0.3)
        assert torch.allclose(real_positions(got, mask), real_positions(expected, mask), atol=ATOL), edge


def test_mask_entries_outside_real_edges_are_ignored(tiny, pair):
    clean, _, mask = pair
    edge_mask = torch.where(tiny.graph.real, 1.0, 0.0)
    assert torch.allclose(run(tiny, clean, mask, edge_mask), run(tiny, clean, mask), atol=ATOL)


def test_mean_values_average_real_positions(tiny, pair):
    clean, _, mask = pair
    outputs = circuits.engine.source_outputs(tiny, clean, mask)
    mean = circuits.engine.mean_values(tiny, clean, mask)
    assert mean.shape == (tiny.graph.n_src, 1, 1, outputs.shape[-1])
    by_hand = outputs[:, mask.bool()].mean(1)
    assert torch.allclose(mean[:, 0, 0], by_hand, atol=1e-6)


def test_source_outputs_sum_to_the_final_residual_stream(tiny, pair):
    """Sources plus the constant biases rebuild the stream that the final norm reads."""
    clean, _, mask = pair
    outputs = circuits.engine.source_outputs(tiny, clean, mask)
    captured = {}
    norm = tiny.adapter.final_norm()
    hook = norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    hf_logits(tiny, clean, mask)
    hook.remove()
    constant = sum(
        (b for b in (tiny.adapter.out_bias(layer) for layer in range(tiny.graph.n_layers)) if b is not None),
        torch.zeros(outputs.shape[-1]),
    )
    # at real positions: padding's content is the model's own business (OPT gives it a position of its own)
    real = mask.bool()
    assert torch.allclose((outputs.sum(0) + constant)[real], captured["x"][real], atol=ATOL)


def test_grad_hook_gives_destination_input_gradients(tiny, pair):
    """The hook's gradients, contracted with the deltas, equal the gradient with respect to the mask."""
    clean, corrupted, mask = pair
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    outputs = circuits.engine.source_outputs(tiny, clean, mask)
    edge_mask = ones(tiny).requires_grad_(True)
    grads = {}
    result = circuits.patched_forward(
        tiny, clean, mask, edge_mask, patch, grad_hook=lambda dsts, g: grads.__setitem__(dsts.start, (dsts, g))
    )
    result.logits[mask.bool()][:, 3].sum().backward()
    delta = (outputs - patch).flatten(1)  # d in_v / d m_uv = out_u - patch_u
    assert len(grads) == 2 * tiny.graph.n_layers + 1
    for dsts, grad in grads.values():
        contracted = delta @ grad.flatten(1).T
        reads = tiny.graph.real[:, dsts]
        assert torch.allclose(edge_mask.grad[:, dsts][reads], contracted[reads], atol=1e-5)


def test_mask_gradient_matches_finite_differences(arch):
    model = circuits.Model.from_hf(make_hf(arch).double())
    clean, corrupted, mask = make_pair(batch=2, seq=6)
    patch = circuits.engine.patching_values(model, mask, corrupted, mask)
    edge_mask = torch.ones(model.graph.n_src, model.graph.n_dst, dtype=torch.float64, requires_grad=True)

    def metric(m):
        logits = circuits.patched_forward(model, clean, mask, m, patch).logits
        return logits[:, 2, 5].sum() - logits[:, 3, 7].sum()

    metric(edge_mask).backward()
    for edge in ("a0.h1->a1.h0<q>", "a0.h0->a1.h0<k>", "m0->m1", "a1.h2->logits"):
        i, j = model.graph.index(edge)
        step = torch.zeros_like(edge_mask)
        step[i, j] = 1e-3  # not smaller: RMSNorm computes in float32 even in a float64 model
        with torch.no_grad():
            numeric = (metric(edge_mask + step) - metric(edge_mask - step)) / 2e-3
        assert torch.isclose(edge_mask.grad[i, j], numeric, rtol=2e-3, atol=5e-4), edge


def test_logit_positions_select_rows(tiny, pair):
    clean, _, mask = pair
    positions = mask.sum(1) - 1
    full = run(tiny, clean, mask)
    picked = run(tiny, clean, mask, logit_positions=positions)
    assert torch.allclose(picked, full[torch.arange(len(clean)), positions], atol=1e-5)


def test_padding_does_not_change_real_positions(tiny):
    clean, _, mask = make_pair(batch=3, seq=8, lengths=[8, 5, 3])
    batched = run(tiny, clean, mask)
    for i, length in enumerate(mask.sum(1).tolist()):
        alone = run(tiny, clean[i : i + 1, :length], mask[i : i + 1, :length])
        assert torch.allclose(batched[i, :length], alone[0], atol=ATOL)


def test_sliding_window_is_applied():
    model = circuits.Model.from_hf(make_hf("mistral"))
    assert model.adapter.window(0) == 5
    clean, _, mask = make_pair(batch=1, seq=9, lengths=[9])
    windowed = run(model, clean, mask)
    model.hf.config.sliding_window = None
    try:
        unwindowed = run(model, clean, mask)
    finally:
        model.hf.config.sliding_window = 5
    assert not torch.allclose(windowed[0, -1], unwindowed[0, -1], atol=ATOL)
    assert torch.allclose(windowed[0, :5], unwindowed[0, :5], atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_in_half_precision(dtype):
    model = circuits.Model.from_hf(make_hf("llama").to(dtype))
    clean, corrupted, mask = make_pair()
    patch = circuits.engine.patching_values(model, mask, corrupted, mask)
    edge_mask = torch.ones(model.graph.n_src, model.graph.n_dst)
    edge_mask[model.graph.index("a0.h1->m1")] = 0
    got = run(model, clean, mask, edge_mask, patch)
    assert got.dtype == dtype and torch.isfinite(got).all()
    full = run(model, clean, mask)
    expected = hf_logits(model, clean, mask)
    assert torch.allclose(full[mask.bool()].float(), expected[mask.bool()].float(), atol=0.05)


def test_with_and_without_autograd_give_the_same_logits(tiny, pair):
    """The engine keeps deltas differently with autograd on and off; the results agree."""
    clean, corrupted, mask = pair
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    generator = torch.Generator().manual_seed(3)
    for density in (0.1, 0.5, 0.9):  # mostly ablated, mixed, mostly kept
        edge_mask = (torch.rand(tiny.graph.n_src, tiny.graph.n_dst, generator=generator) < density).float()
        without = run(tiny, clean, mask, edge_mask, patch)
        with torch.enable_grad():
            tracked = circuits.patched_forward(tiny, clean, mask, edge_mask.requires_grad_(True), patch).logits
        assert torch.allclose(without[mask.bool()], tracked.detach()[mask.bool()], atol=ATOL)


def test_prefix_cache_runs_equal_full_runs(tiny, pair):
    """Resuming from the clean run's cached prefix gives the logits of a whole patched forward."""
    clean, corrupted, mask = pair
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    positions = mask.sum(1) - 1
    cache = circuits.engine.PrefixCache(tiny, clean, mask, patch, positions)
    assert torch.allclose(cache.base_logits, run(tiny, clean, mask, logit_positions=positions), atol=ATOL)
    graph = tiny.graph
    # lower layers first, then higher: a later run must not see rows an earlier one overwrote
    for edge in ("a0.h1->a1.h0<k>", "input->m0", "a1.h2->m2", "m1->a2.h1<q>", "a2.h0->logits", "a0.h0->a1.h0<v>"):
        i, j = graph.index(edge)
        layer = next((s.layer for s in graph.layers if j <= s.mlp_destination), graph.n_layers)
        edge_mask = ones(tiny)
        edge_mask[i, j] = 0
        expected = run(tiny, clean, mask, edge_mask, patch, logit_positions=positions)
        assert torch.allclose(cache.run(edge_mask, layer), expected, atol=ATOL), edge


# --- inputs as users hold them: nested lists and numpy arrays ---------------------------------


def test_patched_forward_on_lists_and_numpy_arrays_gives_the_logits_of_tensors(tiny, pair):
    clean, _, mask = pair
    expected = run(tiny, clean, mask)
    for ids, attention in ((clean.tolist(), mask.tolist()), (clean.numpy(), mask.numpy()), (clean.tolist(), None)):
        got = run(tiny, ids, attention)
        reference = expected if attention is not None else run(tiny, clean, None)
        assert torch.equal(got, reference)


def test_patching_values_and_mean_values_accept_lists_and_numpy_arrays(tiny, pair):
    clean, corrupted, mask = pair
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    assert torch.equal(circuits.engine.patching_values(tiny, mask.tolist(), corrupted.numpy(), mask.tolist()), patch)
    outputs = circuits.engine.source_outputs(tiny, clean, mask)
    assert torch.equal(circuits.engine.source_outputs(tiny, clean.tolist(), mask.numpy()), outputs)
    mean = circuits.engine.mean_values(tiny, clean, mask)
    assert torch.equal(circuits.engine.mean_values(tiny, clean.tolist(), mask.tolist()), mean)
    assert torch.equal(circuits.engine.mean_values(tiny, clean.numpy(), mask.numpy()), mean)
    assert torch.equal(circuits.engine.mean_values(tiny, [(clean.tolist(), mask.numpy())]), mean)


def test_check_batch_makes_lists_long_tensors_on_the_model_device(tiny, pair):
    clean, _, mask = pair
    ids, attention = check_batch(tiny, clean.numpy().astype(np.int32), mask.tolist())
    assert ids.dtype == torch.long and attention.dtype == torch.long
    assert ids.device == tiny.device and attention.device == tiny.device
    assert torch.equal(ids, clean) and torch.equal(attention, mask)


def test_float_numpy_ids_are_an_error_naming_the_dtype(tiny, pair):
    clean, _, mask = pair
    with pytest.raises(
        circuits.errors.CircuitsError, match="input ids must be integer token ids, got dtype torch.float"
    ):
        run(tiny, clean.numpy().astype(float), mask)


def test_three_dimensional_ids_are_an_error_naming_the_shape(tiny, pair):
    clean, _, mask = pair
    with pytest.raises(
        circuits.errors.CircuitsError, match=r"input ids must be a \[batch, seq\] tensor, got \(1, 4, 9\)"
    ):
        run(tiny, clean[None].tolist(), mask)


def test_ragged_id_lists_are_an_error_naming_the_example(tiny):
    with pytest.raises(
        circuits.errors.CircuitsError, match="example 1: the input ids have 2 entries but example 0's have 3"
    ):
        run(tiny, [[1, 2, 3], [4, 5]], None)


def test_negative_id_in_a_list_names_the_example_and_position(tiny):
    with pytest.raises(
        circuits.errors.CircuitsError, match="example 1, position 2: token id -4 is outside the vocabulary"
    ):
        run(tiny, [[1, 2, 3], [4, 5, -4]], None)


def test_bool_ids_are_an_error(tiny):
    with pytest.raises(circuits.errors.CircuitsError, match="integer token ids, got dtype torch.bool"):
        run(tiny, np.array([[True, False]]), None)


def test_attention_mask_list_of_the_wrong_shape_is_an_error(tiny, pair):
    clean, _, mask = pair
    with pytest.raises(circuits.errors.CircuitsError, match="input attention mask has shape"):
        run(tiny, clean, mask[:, :-1].tolist())
