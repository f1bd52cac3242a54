"""The bundled real model: SmolLM2-135M-Instruct (Llama architecture with GQA)."""

from __future__ import annotations

import pytest
import torch
from oracle import Oracle

import circuits

pytestmark = pytest.mark.slow

CLEAN = [
    "When John and Mary went to the store, John gave a drink to",
    "After Alice and Bob met at the park, Bob handed a book to",
    "The capital of France is",
]
CORRUPTED = [
    "When Anna and Peter went to the store, Kate gave a drink to",
    "After Carol and David met at the park, Frank handed a book to",
    "The capital of Spain is",
]


@pytest.fixture(scope="module")
def smollm2():
    return circuits.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def batch(smollm2):
    tok = smollm2.tokenizer
    clean = tok(CLEAN, return_tensors="pt", padding=True, padding_side="right")
    corrupted = tok(CORRUPTED, return_tensors="pt", padding=True, padding_side="right")
    assert (clean.attention_mask == corrupted.attention_mask).all(), "test prompts must pair up token for token"
    return clean.input_ids, corrupted.input_ids, clean.attention_mask


def test_graph_counts(smollm2):
    graph = smollm2.graph
    assert (graph.n_src, graph.n_dst, len(graph.edges)) == (301, 481, 70_651)
    assert "a29.h2<k>" in graph.destinations and "a29.h3<k>" not in graph.destinations


def test_repr_names_the_shape(smollm2):
    assert "llama, 30 layers, 9 heads, 3 kv heads, 70,651 edges" in repr(smollm2)


def test_predicts_the_indirect_object(smollm2, batch):
    clean, _, mask = batch
    with torch.no_grad():
        logits = circuits.patched_forward(smollm2, clean, mask, logit_positions=mask.sum(1) - 1).logits
    assert smollm2.tokenizer.decode(logits[0].argmax()) == " Mary"
    assert smollm2.tokenizer.decode(logits[2].argmax()) == " Paris"


def test_full_mask_reproduces_hf_logits(smollm2, batch):
    clean, _, mask = batch
    with torch.no_grad():
        expected = smollm2.hf(clean, attention_mask=mask).logits[mask.bool()]
        ones = torch.ones(smollm2.graph.n_src, smollm2.graph.n_dst)
        got = circuits.patched_forward(smollm2, clean, mask, ones).logits[mask.bool()]
    assert (got - expected).abs().max() < 1e-4


def test_empty_mask_reproduces_corrupted_logits(smollm2, batch):
    clean, corrupted, mask = batch
    patch = circuits.engine.patching_values(smollm2, mask, corrupted, mask)
    with torch.no_grad():
        expected = smollm2.hf(corrupted, attention_mask=mask).logits[mask.bool()]
        zeros = torch.zeros(smollm2.graph.n_src, smollm2.graph.n_dst)
        got = circuits.patched_forward(smollm2, clean, mask, zeros, patch).logits[mask.bool()]
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize(
    "edge", ["a3.h1->a20.h2<k>", "a10.h8->a14.h4<q>", "m2->a7.h0<v>", "a25.h5->m27", "m29->logits"]
)
def test_single_edge_patch_equals_hook_oracle(smollm2, batch, edge):
    clean, corrupted, mask = batch
    oracle = Oracle(smollm2.hf)
    ablation = oracle.source_output(edge.split("->")[0], corrupted, mask)
    expected = oracle.patch_edge(edge, clean, mask, ablation)[mask.bool()]
    with torch.no_grad():
        unpatched = smollm2.hf(clean, attention_mask=mask).logits[mask.bool()]
    assert (expected - unpatched).abs().max() > 1e-3, "the patch must change something for the test to mean anything"
    edge_mask = torch.ones(smollm2.graph.n_src, smollm2.graph.n_dst)
    edge_mask[smollm2.graph.index(edge)] = 0
    with torch.no_grad():
        patch = circuits.engine.patching_values(smollm2, mask, corrupted, mask)
        got = circuits.patched_forward(smollm2, clean, mask, edge_mask, patch).logits[mask.bool()]
    assert (got - expected).abs().max() < 1e-4
