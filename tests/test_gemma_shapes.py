"""Gemma beyond the tiny models: the real Gemma-3-270m shape, Gemma's 1 + w norms in the written-out gradient
path, and the configurations the adapter refuses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

import circuits
from circuits.arch import norms
from circuits.errors import CircuitsError
from circuits.testing import tiny_hf, tiny_pair

_TINY = dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, head_dim=8
)


def gemma3_270m_config(vocab_size: int = 512) -> Gemma3TextConfig:
    """google/gemma-3-270m's published shape (its vocabulary, 262144, cut down for speed)."""
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        sliding_window_pattern=6,  # 5 local layers : 1 global
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


@pytest.fixture(scope="module")
def gemma3_270m():
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(gemma3_270m_config(), dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from their zero init, so that their 1 + w matters
        for name, parameter in hf.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.3)
    return hf


def test_gemma3_270m_shape_builds_and_full_mask_equals_hf(gemma3_270m):
    hf = gemma3_270m
    model = circuits.Model.from_hf(hf)
    adapter = model.adapter
    shape = (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.head_dim, adapter.d_model)
    assert shape == (18, 4, 1, 256, 640)
    assert [adapter.window(layer) for layer in range(18)] == ([512] * 5 + [None]) * 3
    assert adapter.scale(0) == 256**-0.5
    assert model.graph.n_src == 1 + 18 * 5  # input, 4 heads and an MLP per layer

    clean, _, mask = tiny_pair(batch=3, seq=12)
    position_ids = torch.arange(12).expand(3, 12)
    tables = adapter.rotary(adapter.embed(clean, position_ids), position_ids)
    assert set(tables) == {"full_attention", "sliding_attention"}
    assert not torch.allclose(tables["full_attention"][0], tables["sliding_attention"][0])  # two bases
    with torch.no_grad():
        expected = hf(clean, attention_mask=mask).logits
        logits = circuits.patched_forward(model, clean, mask).logits
    real = mask.bool()
    scale = float(expected[real].abs().max())
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-4 * scale)


@pytest.mark.slow
def test_gemma3_270m_shape_past_the_sliding_window(gemma3_270m):
    """530 positions: the local layers' window of 512 cuts in."""
    hf = gemma3_270m
    model = circuits.Model.from_hf(hf)
    ids = torch.randint(3, 512, (1, 530), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits[:, -1]
        logits = circuits.patched_forward(model, ids, logit_positions=torch.tensor([529])).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_norm_gradients_take_the_written_out_one_plus_w_formula(arch, monkeypatch):
    """The engine's q/k/v gradients go through ``norm_input_gradients``: for Gemma's (1 + w) RMSNorm it must be
    the written-out formula, not the autograd fallback."""
    norm = tiny_hf(arch).model.layers[0].input_layernorm
    generator = torch.Generator().manual_seed(0)
    stream = torch.randn((1, 2, 5, 32), generator=generator) * 3
    grads = torch.randn((3, 2, 5, 32), generator=generator)
    expected = norms._by_autograd(norm, stream, grads)
    norms.norm_input_gradients(norm, stream, grads)  # checks the formulas once per class
    assert norms._VERIFIED[(type(norm), "rms+1")] and not norms._VERIFIED[(type(norm), "rms")]

    def no_autograd(*args):
        raise AssertionError("the autograd fallback ran")

    monkeypatch.setattr(norms, "_by_autograd", no_autograd)
    got = norms.norm_input_gradients(norm, stream, grads)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "config, field",
    [
        (Gemma3TextConfig(**_TINY, use_bidirectional_attention=True), "use_bidirectional_attention"),
        (Gemma3TextConfig(**_TINY, attention_bias=True), "attention_bias"),  # a bias under the post-attention norm
        (Gemma2Config(**_TINY, attention_bias=True), "attention_bias"),
    ],
)
def test_configurations_without_an_exact_graph_are_refused_at_construction(config, field):
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(CircuitsError, match=f"model_type '{config.model_type}': {field}"):
        circuits.Model.from_hf(hf)
