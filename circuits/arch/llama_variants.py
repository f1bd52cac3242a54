"""Llama-shaped families that differ in a few declared places.

- Granite: the embeddings times ``embedding_multiplier``, every attention and MLP write to the stream times
  ``residual_multiplier`` (each head's output, the output bias and the MLP alike), the attention scale
  ``attention_multiplier`` (the module's own ``scaling``), the logits divided by ``logits_scaling``.
- Cohere: a parallel block (attention and MLP read ``input_layernorm`` of the same stream), LayerNorms without
  bias, interleaved rotary (the modeling file's own helper), logits times ``logit_scale``, optional per-head
  LayerNorms over q and k (``use_qk_norm``, weights ``[heads, head_dim]``).
- StableLM: LayerNorms with biases, q/k/v biases, partial rotary (the first ``rotary_ndims`` of each head),
  optional per-head LayerNorms over q and k (``qk_layernorm``), optional parallel block (``use_parallel_residual``:
  the MLP reads ``input_layernorm`` of the stream the heads read).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Context, project_heads
from .llama import LlamaAdapter


class GraniteAdapter(LlamaAdapter):
    model_types = {
        "granite": "Granite 3 dense, PowerLM (embedding, residual and attention multipliers, "
        "logits divided by logits_scaling)"
    }

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids, position_ids) * self.config.embedding_multiplier

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        return super().head_outputs(layer, z) * self.config.residual_multiplier

    def out_bias(self, layer: int) -> torch.Tensor | None:
        bias = super().out_bias(layer)
        return None if bias is None else bias * self.config.residual_multiplier

    def attention_output(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        return super().attention_output(layer, z) * self.config.residual_multiplier

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return super().mlp(layer, x) * self.config.residual_multiplier

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return super().unembed(x) / self.config.logits_scaling


class _PerHeadQKNorm(LlamaAdapter):
    """q/k/v projections, then optional norms over each head's query and key (``qk_norm``), then rotary over the
    first ``rotary_dims`` of each head."""

    def qk_norm(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[B, H, T, e]`` and keys ``[B, G, T, e]`` after the per-head norms, if any."""
        return q, k

    def rotary_dims(self, layer: int) -> int:
        return self.head_dim

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        attn = self.blocks[layer].self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (project_heads(x, p, n) for x, p, n in zip(parts, projections, self.qkv_counts(), strict=True))
        q, k = self.qk_norm(layer, q, k)
        cos, sin = ctx.rotary
        r = self.rotary_dims(layer)
        if r == self.head_dim:
            q, k = self._apply_rotary(q, k, cos, sin)
        else:
            q_rot, k_rot = self._apply_rotary(q[..., :r], k[..., :r], cos, sin)
            q, k = torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)
        return q, k, v


class CohereAdapter(_PerHeadQKNorm):
    model_types = {
        "cohere": "Command-R (parallel block, LayerNorms without bias, interleaved rotary, logit_scale; "
        "per-head q/k LayerNorms if use_qk_norm)"
    }

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.parallel = True

    def qk_norm(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.blocks[layer].self_attn
        if not attn.use_qk_norm:
            return q, k
        # LayerNorms with weights [heads, e]: they read heads laid out [B, T, heads, e]
        return attn.q_norm(q.transpose(1, 2)).transpose(1, 2), attn.k_norm(k.transpose(1, 2)).transpose(1, 2)

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(block.input_layernorm(x))

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return super().unembed(x) * self.hf.logit_scale


class StableLmAdapter(_PerHeadQKNorm):
    model_types = {
        "stablelm": "StableLM 2, StableLM-3B-4E1T (LayerNorms, partial rotary; q/k/v biases, per-head q/k "
        "LayerNorms, parallel blocks where configured)"
    }

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.parallel = bool(self.config.use_parallel_residual)

    def qk_norm(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.blocks[layer].self_attn  # one LayerNorm per head, over heads laid out [B, heads, T, e]
        return (attn.q_layernorm(q), attn.k_layernorm(k)) if attn.qk_layernorm else (q, k)

    def rotary_dims(self, layer: int) -> int:
        return self.blocks[layer].self_attn.rotary_ndims

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp((block.input_layernorm if self.parallel else block.post_attention_layernorm)(x))
