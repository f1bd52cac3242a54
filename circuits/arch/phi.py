"""Phi (Phi-1, 1.5, 2) and Phi-3: two declared differences of the Llama family's layout (``model.layers``).

- Phi: parallel block (attention and MLP read the same ``input_layernorm``, a LayerNorm), separate q/k/v with
  biases, optional per-head LayerNorms on q and k (``qk_layernorm``), rotary positions on the first
  ``partial_rotary_factor`` of each head's dimensions, a ``dense`` output projection with a bias, a final
  LayerNorm ``final_layernorm`` and an ``lm_head`` with a bias.
- Phi-3: Llama-shaped (RMSNorm, sequential block) with one fused ``qkv_proj`` (rows [q | k | v], grouped-query
  attention possible), partial rotary when configured (transformers' own helper rotates the leading dimensions)
  and, when ``sliding_window`` is set, that window on every layer. Its fused ``gate_up_proj`` is inside the MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Context, per_head_linear, split_heads
from .gptj import SeparateQKV
from .llama import LlamaAdapter


class PhiAdapter(SeparateQKV, LlamaAdapter):
    model_types = {
        "phi": "Phi-1, 1.5, 2 (parallel block, partial rotary, q/k/v biases, optional per-head q/k LayerNorms)"
    }

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.parallel = True

    def after_projection(self, layer: int, q, k, v, ctx: Context):
        attn = self.attention(layer)
        if attn.qk_layernorm:  # a LayerNorm over each head's query and key
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        cos, sin = ctx.rotary
        r = cos.shape[-1]  # the rotated leading dimensions of each head
        q_turned, k_turned = self._apply_rotary(q[..., :r], k[..., :r], cos, sin)
        return torch.cat([q_turned, q[..., r:]], -1), torch.cat([k_turned, k[..., r:]], -1), v

    def out_projection(self, layer: int) -> nn.Module:
        return self.attention(layer).dense

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(block.input_layernorm(x))

    def final_norm(self) -> nn.Module:
        return self.body.final_layernorm


class Phi3Adapter(LlamaAdapter):
    model_types = {"phi3": "Phi-3, Phi-4 (fused q/k/v and gate/up projections, sliding window, partial rotary)"}

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        fused = self.blocks[layer].self_attn.qkv_proj  # weight [(H + 2G) e, D]: q rows, then k, then v
        counts, e = self.qkv_counts(), self.head_dim
        sizes = [n * e for n in counts]
        if parts[0].shape[0] == 1 and parts[0] is parts[1] is parts[2]:  # the shared stream: the fused projection
            q, k, v = (split_heads(y, n) for y, n in zip(fused(parts[0][0]).split(sizes, -1), counts, strict=True))
        else:
            biases = (None,) * 3 if fused.bias is None else fused.bias.split(sizes)
            q, k, v = (
                per_head_linear(part, w.view(n, e, self.d_model), None if b is None else b.view(n, e))
                for part, w, b, n in zip(parts, fused.weight.split(sizes), biases, counts, strict=True)
            )
        cos, sin = ctx.rotary
        q, k = self._apply_rotary(q, k, cos, sin)
        return q, k, v

    def window(self, layer: int) -> int | None:
        return getattr(self.config, "sliding_window", None)
