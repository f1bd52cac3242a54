"""Configuration variants of supported families beyond the tiny architectures: each reproduces transformers."""

from __future__ import annotations

import pytest
import torch
from oracle import Oracle
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig

import circuits
from circuits.testing import VOCAB, tiny_pair

ATOL = 1e-4
_FALCON = dict(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=48, num_hidden_layers=3, num_attention_heads=4)


def perturbed(config) -> torch.nn.Module:
    """A random HF model of ``config`` with large weights and every parameter perturbed (as ``tiny_hf``)."""
    torch.manual_seed(0)
    config.initializer_range = 0.3
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return hf.eval()


def check_reproduces_hf(model: circuits.Model) -> None:
    """Full mask (per-destination path, per-head outputs) = HF; empty mask with patching = HF on corrupted."""
    clean, corrupted, mask = tiny_pair()
    real = mask.bool()
    ones = torch.ones(model.graph.n_src, model.graph.n_dst)
    with torch.no_grad():
        full = circuits.patched_forward(model, clean, mask, ones, keep_outputs=True).logits
        assert torch.allclose(full[real], model.hf(clean, attention_mask=mask).logits[real], atol=ATOL)
        patch = circuits.engine.patching_values(model, mask, corrupted, mask)
        empty = circuits.patched_forward(model, clean, mask, torch.zeros_like(ones), patch).logits
        assert torch.allclose(empty[real], model.hf(corrupted, attention_mask=mask).logits[real], atol=ATOL)


FALCON_VARIANTS = {
    # Falcon-180B style with one norm: the attention's norm feeds the MLP too
    "new_one_norm": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    "new_alibi": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=True, bias=True),
    "multi_query_sequential_alibi": dict(multi_query=True, parallel_attn=False, alibi=True),
    "multi_head_parallel": dict(multi_query=False, parallel_attn=True, bias=True),
}


@pytest.mark.parametrize("variant", sorted(FALCON_VARIANTS))
def test_falcon_variant_reproduces_hf_and_the_oracle(variant):
    model = circuits.Model.from_hf(perturbed(FalconConfig(**_FALCON, **FALCON_VARIANTS[variant])))
    check_reproduces_hf(model)
    clean, corrupted, mask = tiny_pair()
    oracle = Oracle(model.hf)
    patch = circuits.engine.patching_values(model, mask, corrupted, mask)
    for edge in ("input->a0.h1<q>", f"a0.h2->a1.h{model.graph.n_kv_heads - 1}<k>", "m0->a1.h0<v>", "a0.h0->m1"):
        edge_mask = torch.ones(model.graph.n_src, model.graph.n_dst)
        edge_mask[model.graph.index(edge)] = 0
        with torch.no_grad():
            got = circuits.patched_forward(model, clean, mask, edge_mask, patch).logits
        expected = oracle.patch_edge(edge, clean, mask, oracle.source_output(edge.split("->")[0], corrupted, mask))
        assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=ATOL), edge


def test_bloom_slow_but_exact_leaves_the_dense_biases_out_as_transformers_does():
    config = dict(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4, pretraining_tp=2)
    model = circuits.Model.from_hf(perturbed(BloomConfig(**config, slow_but_exact=True)))
    check_reproduces_hf(model)
    assert model.adapter.out_bias(0) is None
    clean, _, mask = tiny_pair()
    with torch.no_grad():  # the same weights on the fast path: the biases count
        fast = perturbed(BloomConfig(**config))(clean, attention_mask=mask).logits
        slow = model.hf(clean, attention_mask=mask).logits
    assert not torch.allclose(fast[mask.bool()], slow[mask.bool()], atol=1e-2)
