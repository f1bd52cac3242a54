"""The finer interventions of the patched forward (edges resolved by position or span, a source's output
dimensions, the MLPs' hidden units) against the hook-based oracle, on every tiny architecture."""

from __future__ import annotations

import pytest
import torch
from oracle import Oracle
from test_engine import edges_to_check

import circuits
from circuits.engine import mlp_hidden_values, patching_values
from circuits.errors import CircuitsError
from circuits.testing import tiny_hf

ATOL = 1e-4
MIXTURES_OF_EXPERTS = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss"}
POSITION = 4  # corrupted in some example of tiny_pair, and real in every one
SPAN = 1  # of 3: the ablated one


def real(logits, mask):
    return logits[mask.bool()]


def run(model, ids, mask, edge_mask=None, patch=None, **kwargs):
    with torch.no_grad():
        return circuits.patched_forward(model, ids, mask, edge_mask, patch, **kwargs).logits


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model.hf(ids, attention_mask=mask).logits


def assert_changes(expected, clean_logits, mask, what, floor=1e-3):
    change = (expected - clean_logits)[mask.bool()].abs().max()
    assert change > floor, f"{what}: the patch changes nothing ({float(change):.2e})"


def assert_close(got, expected, mask, what, atol=ATOL):
    difference = (real(got, mask) - real(expected, mask)).abs().max()
    assert difference <= atol, f"{what}: differs by {float(difference):.2e}"


def sources_to_check(graph):
    last = graph.n_layers - 1
    return ["input", "a0.h1", "m0", "a1.h3", f"a{last}.h2", f"m{last}"]


def span_ids(ids):
    """Each position's span, 0 to 2, drawn at random."""
    return torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(5))


def span_mask(model, edge, span, n_spans, value=0.0):
    edge_mask = torch.ones(model.graph.n_src, model.graph.n_dst, n_spans)
    edge_mask[(*model.graph.index(edge), span)] = value
    return edge_mask


def dense_mlps(arch, model, mask):
    """Skip a mixture of experts for the hidden-unit level, once it is seen to refuse it."""
    if arch not in MIXTURES_OF_EXPERTS:
        return
    ids = torch.zeros_like(mask)
    with pytest.raises(CircuitsError, match="mixture of experts"):
        mlp_hidden_values(model, ids, mask)
    with pytest.raises(CircuitsError, match="mixture of experts"):
        run(model, ids, mask, hidden_mask=torch.ones(model.graph.n_layers, 48))
    pytest.skip(f"{arch}: a mixture of experts refuses the hidden-unit level (checked)")


# edges resolved by position and by span


def test_edge_ablated_at_one_position_equals_oracle(tiny, pair):
    clean, corrupted, mask = pair
    oracle = Oracle(tiny.hf)
    patch = patching_values(tiny, mask, corrupted, mask)
    clean_logits = hf_logits(tiny, clean, mask)
    spans = torch.arange(clean.shape[1]).expand_as(clean).contiguous()  # every position its own span
    for edge in edges_to_check(tiny.graph):
        src, _ = edge.split("->")
        got = run(tiny, clean, mask, span_mask(tiny, edge, POSITION, clean.shape[1]), patch, spans=spans)
        ablation = oracle.source_output(src, corrupted, mask)
        expected = oracle.patch_edge(edge, clean, mask, ablation, positions=spans == POSITION)
        assert_changes(expected, clean_logits, mask, edge)
        assert_close(got, expected, mask, edge)


def test_edge_ablated_in_one_span_of_several_positions_equals_oracle(tiny, pair):
    clean, corrupted, mask = pair
    oracle = Oracle(tiny.hf)
    patch = patching_values(tiny, mask, corrupted, mask)
    clean_logits = hf_logits(tiny, clean, mask)
    spans = span_ids(clean)
    for edge in edges_to_check(tiny.graph):
        src, _ = edge.split("->")
        got = run(tiny, clean, mask, span_mask(tiny, edge, SPAN, 3), patch, spans=spans)
        ablation = oracle.source_output(src, corrupted, mask)
        expected = oracle.patch_edge(edge, clean, mask, ablation, positions=spans == SPAN)
        assert_changes(expected, clean_logits, mask, edge)
        assert_close(got, expected, mask, edge)


def test_fractional_span_mask_equals_oracle(tiny, pair):
    """A mask value of 0.3 in one span, with zero ablation and with patching."""
    clean, corrupted, mask = pair
    oracle = Oracle(tiny.hf)
    patch = patching_values(tiny, mask, corrupted, mask)
    spans = span_ids(clean)
    for edge in ("a0.h1->a1.h0<k>", "input->m0", "a1.h0->logits", "m0->a1.h2<q>"):
        src, _ = edge.split("->")
        for values, ablation in ((None, None), (patch, oracle.source_output(src, corrupted, mask))):
            got = run(tiny, clean, mask, span_mask(tiny, edge, SPAN, 3, 0.3), values, spans=spans)
            expected = oracle.patch_edge(edge, clean, mask, ablation, weight=0.3, positions=spans == SPAN)
            assert_close(got, expected, mask, f"{edge}, {'zero' if values is None else 'patching'}")


def test_span_mask_equal_across_spans_equals_the_2d_mask(arch, pair):
    """In float64, so that only the order of the sums differs (float32 rounding alone reaches ~2e-6)."""
    model = circuits.Model.from_hf(tiny_hf(arch).double())
    clean, corrupted, mask = pair
    patch = patching_values(model, mask, corrupted, mask)
    generator = torch.Generator().manual_seed(3)
    edge_mask = torch.rand(model.graph.n_src, model.graph.n_dst, generator=generator, dtype=torch.float64)
    resolved = edge_mask[..., None].expand(-1, -1, 3).contiguous()
    got = run(model, clean, mask, resolved, patch, spans=span_ids(clean))
    assert_close(got, run(model, clean, mask, edge_mask, patch), mask, "3 equal spans", atol=1e-6)


# a source's output dimensions


def test_one_output_dimension_of_a_source_ablated_equals_oracle(tiny, pair):
    clean, corrupted, mask = pair
    oracle = Oracle(tiny.hf)
    patch = patching_values(tiny, mask, corrupted, mask)
    clean_logits = hf_logits(tiny, clean, mask)
    d_model = patch.shape[-1]
    for k, src in enumerate(sources_to_check(tiny.graph)):
        dimension = (5 * k + 3) % d_model
        neuron_mask = torch.ones(tiny.graph.n_src, d_model)
        neuron_mask[tiny.graph.source_index(src), dimension] = 0
        got = run(tiny, clean, mask, None, patch, neuron_mask=neuron_mask)
        weight = torch.ones(d_model)
        weight[dimension] = 0
        expected = oracle.patch_source(src, clean, mask, oracle.source_output(src, corrupted, mask), weight)
        assert_changes(expected, clean_logits, mask, f"{src}[{dimension}]", floor=1e-4)
        assert_close(got, expected, mask, f"{src}[{dimension}]")


def test_fractional_neuron_mask_with_zero_ablation_equals_oracle(tiny, pair):
    clean, _, mask = pair
    oracle = Oracle(tiny.hf)
    d_model = tiny.adapter.d_model
    generator = torch.Generator().manual_seed(4)
    for src in sources_to_check(tiny.graph):
        weight = torch.rand(d_model, generator=generator)
        neuron_mask = torch.ones(tiny.graph.n_src, d_model)
        neuron_mask[tiny.graph.source_index(src)] = weight
        got = run(tiny, clean, mask, None, None, neuron_mask=neuron_mask)
        assert_close(got, oracle.patch_source(src, clean, mask, None, weight), mask, src)


def test_neuron_row_of_zeros_equals_ablating_every_edge_out_of_the_source(tiny, pair):
    clean, corrupted, mask = pair
    patch = patching_values(tiny, mask, corrupted, mask)
    for src in sources_to_check(tiny.graph):
        u = tiny.graph.source_index(src)
        neuron_mask = torch.ones(tiny.graph.n_src, patch.shape[-1])
        neuron_mask[u] = 0
        edge_mask = torch.ones(tiny.graph.n_src, tiny.graph.n_dst)
        edge_mask[u] = 0
        got = run(tiny, clean, mask, None, patch, neuron_mask=neuron_mask)
        assert_close(got, run(tiny, clean, mask, edge_mask, patch), mask, src)


# the MLPs' hidden units


def test_mlp_hidden_values_equal_oracle_hidden_units(arch, tiny, pair):
    _, corrupted, mask = pair
    dense_mlps(arch, tiny, mask)
    oracle = Oracle(tiny.hf)
    values = mlp_hidden_values(tiny, corrupted, mask)
    for layer in range(tiny.graph.n_layers):
        expected = oracle.hidden_units(layer, corrupted, mask)
        assert values[layer].shape == expected.shape
        assert_close(values[layer], expected, mask, f"layer {layer}", atol=1e-5)


def test_one_hidden_unit_patched_to_its_corrupted_value_equals_oracle(arch, tiny, pair):
    clean, corrupted, mask = pair
    dense_mlps(arch, tiny, mask)
    oracle = Oracle(tiny.hf)
    values = mlp_hidden_values(tiny, corrupted, mask)
    clean_logits = hf_logits(tiny, clean, mask)
    for layer in range(tiny.graph.n_layers):
        unit = (17 * layer + 5) % values.shape[-1]
        hidden_mask = torch.ones(tiny.graph.n_layers, values.shape[-1])
        hidden_mask[layer, unit] = 0
        got = run(tiny, clean, mask, hidden_mask=hidden_mask, hidden_patch=values)
        value = oracle.hidden_units(layer, corrupted, mask)[..., unit]
        expected = oracle.patch_hidden(layer, unit, clean, mask, value)
        assert_changes(expected, clean_logits, mask, f"m{layer} unit {unit}", floor=1e-4)
        assert_close(got, expected, mask, f"m{layer} unit {unit}")


def test_fractional_hidden_mask_with_zero_patch_equals_oracle(arch, tiny, pair):
    clean, _, mask = pair
    dense_mlps(arch, tiny, mask)
    oracle = Oracle(tiny.hf)
    d_mlp = circuits.engine.mlp_width(tiny)
    for layer in range(tiny.graph.n_layers):
        unit = (11 * layer + 2) % d_mlp
        hidden_mask = torch.ones(tiny.graph.n_layers, d_mlp)
        hidden_mask[layer, unit] = 0.3
        got = run(tiny, clean, mask, hidden_mask=hidden_mask)
        expected = oracle.patch_hidden(layer, unit, clean, mask, None, weight=0.3)
        assert_close(got, expected, mask, f"m{layer} unit {unit}")


def test_every_hidden_unit_patched_equals_ablating_every_mlp_source(arch, tiny, pair):
    clean, corrupted, mask = pair
    dense_mlps(arch, tiny, mask)
    values = mlp_hidden_values(tiny, corrupted, mask)
    got = run(tiny, clean, mask, hidden_mask=torch.zeros(values.shape[0], values.shape[-1]), hidden_patch=values)
    edge_mask = torch.ones(tiny.graph.n_src, tiny.graph.n_dst)
    edge_mask[[slots.mlp_source for slots in tiny.graph.layers]] = 0
    expected = run(tiny, clean, mask, edge_mask, patching_values(tiny, mask, corrupted, mask))
    assert_changes(expected, hf_logits(tiny, clean, mask), mask, "every MLP")
    assert_close(got, expected, mask, "every MLP")


# refusals


def refused(match, model, ids, mask, *args, **kwargs):
    with pytest.raises(CircuitsError, match=match):
        run(model, ids, mask, *args, **kwargs)


def test_span_mask_without_spans_is_refused(tiny, pair):
    clean, _, mask = pair
    refused("needs each position's span", tiny, clean, mask, torch.ones(tiny.graph.n_src, tiny.graph.n_dst, 3))


def test_spans_with_a_2d_mask_are_refused(tiny, pair):
    clean, _, mask = pair
    edge_mask = torch.ones(tiny.graph.n_src, tiny.graph.n_dst)
    refused("not resolved by span", tiny, clean, mask, edge_mask, spans=span_ids(clean))


def test_spans_out_of_range_are_refused(tiny, pair):
    clean, _, mask = pair
    edge_mask = torch.ones(tiny.graph.n_src, tiny.graph.n_dst, 3)
    for position, span in ((2, 3), (5, -1)):
        spans = span_ids(clean)
        spans[1, position] = span
        message = f"example 1, position {position}: span {span} is not one of the mask's 3"
        refused(message, tiny, clean, mask, edge_mask, spans=spans)


def test_spans_of_wrong_shape_or_dtype_are_refused(tiny, pair):
    clean, _, mask = pair
    edge_mask = torch.ones(tiny.graph.n_src, tiny.graph.n_dst, 3)
    for spans in (span_ids(clean).int(), span_ids(clean)[:, 1:], span_ids(clean).float()):
        refused("spans must be a long tensor of the ids' shape", tiny, clean, mask, edge_mask, spans=spans)


def test_span_mask_of_wrong_shape_or_dtype_is_refused(tiny, pair):
    clean, _, mask = pair
    n_src, n_dst = tiny.graph.n_src, tiny.graph.n_dst
    spans = span_ids(clean)
    for shape in ((n_src, n_dst + 1, 3), (n_src, n_dst, 3, 1)):
        refused(r"edge mask has shape", tiny, clean, mask, torch.ones(shape), spans=spans)
    refused("edge mask must be a float tensor", tiny, clean, mask, torch.ones(n_src, n_dst, 3).long(), spans=spans)


def test_neuron_mask_of_wrong_shape_or_dtype_is_refused(tiny, pair):
    clean, _, mask = pair
    n_src, d_model = tiny.graph.n_src, tiny.adapter.d_model
    for shape in ((n_src, d_model + 1), (n_src - 1, d_model), (n_src, 1, d_model)):
        refused(r"neuron mask has shape .* \[n_src, d_model\]", tiny, clean, mask, neuron_mask=torch.ones(shape))
    refused("neuron mask must be a float tensor", tiny, clean, mask, neuron_mask=torch.ones(n_src, d_model).long())


def test_neuron_mask_with_an_edge_mask_is_refused(tiny, pair):
    clean, _, mask = pair
    edge_mask = torch.ones(tiny.graph.n_src, tiny.graph.n_dst)
    neuron_mask = torch.ones(tiny.graph.n_src, tiny.adapter.d_model)
    refused("without an edge mask", tiny, clean, mask, edge_mask, neuron_mask=neuron_mask)


def test_hidden_mask_of_wrong_shape_or_dtype_is_refused(arch, tiny, pair):
    clean, _, mask = pair
    dense_mlps(arch, tiny, mask)
    n_layers, d_mlp = tiny.graph.n_layers, circuits.engine.mlp_width(tiny)
    for shape in ((n_layers, d_mlp + 1), (n_layers + 1, d_mlp), (d_mlp,)):
        refused(r"hidden-unit mask has shape .* \[n_layers, d_mlp\]", tiny, clean, mask, hidden_mask=torch.ones(shape))
    refused("hidden-unit mask must be a float tensor", tiny, clean, mask, hidden_mask=torch.ones(n_layers, d_mlp).int())
