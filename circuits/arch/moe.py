"""Mixture-of-experts members of the Llama family: Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss.

Attention is the Llama family's (Qwen2-MoE's q/k/v biases, Qwen3-MoE's per-head q/k norms and gpt-oss's
q/k/v/o biases through the same projections). The mixture of experts is ONE node, ``mL``: the block's own HF
module, router, top-k experts, Qwen2-MoE's sigmoid-gated shared expert and gpt-oss's clamped SwiGLU included, is
called on the normed stream. Routing is discrete, so the engine reproduces HF exactly, and gradients flow through
the chosen experts and their routing weights as in HF's own backward. Layers that HF builds dense
(``mlp_only_layers``, ``decoder_sparse_step``) are the same call on a plain MLP.

gpt-oss adds per-head attention sinks (a learned logit per head in the softmax's denominator, dropped after it)
and alternating sliding and full layers (``layer_types``); its rotary tables (YaRN) come from its own rotary module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CircuitsError
from .llama import LlamaAdapter


class MoEAdapter(LlamaAdapter):
    model_types = {
        "mixtral": "Mixtral (top-k routed experts as one MLP node; an optional sliding window for every layer)",
        "qwen2_moe": "Qwen1.5-MoE, Qwen2-MoE (routed experts and a sigmoid-gated shared expert as one MLP node, "
        "dense MLP layers by mlp_only_layers / decoder_sparse_step, q/k/v biases, sliding windows per layer type)",
        "qwen3_moe": "Qwen3-MoE (routed experts as one MLP node, dense MLP layers by mlp_only_layers / "
        "decoder_sparse_step, per-head q/k RMSNorms, an optional sliding window)",
    }

    def window(self, layer: int) -> int | None:
        if getattr(self.config, "layer_types", None):  # Qwen2-MoE, gpt-oss: per layer
            return super().window(layer)
        # Mixtral, Qwen3-MoE: one window for every layer when set (Qwen3-MoE clears it unless use_sliding_window)
        return getattr(self.config, "sliding_window", None) or None

    def mlp_hidden_module(self, layer: int) -> nn.Module:
        raise CircuitsError(
            f"{self.config.model_type}: a mixture of experts has hidden units per expert, chosen per token by its"
            " router, not one set of MLP hidden units; use level='neuron' (the MLP node's output dimensions) instead"
        )

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        normed = block.post_attention_layernorm(x)
        out = block.mlp(normed.reshape(-1, *normed.shape[-2:]))  # the MoE blocks take [batch, seq, D]
        if isinstance(out, tuple):  # gpt-oss also returns its router scores
            out = out[0]
        return out.reshape(normed.shape)


class GptOssAdapter(MoEAdapter):
    model_types = {
        "gpt_oss": "gpt-oss (attention sinks, alternating sliding and full layers, q/k/v/o biases, YaRN rotary, "
        "top-k routed experts with a clamped SwiGLU as one MLP node)"
    }

    def sink_logits(self, layer: int) -> torch.Tensor:
        return self.blocks[layer].self_attn.sinks
