"""The adapter for ``circuits.native.NativeTransformer`` (``model_type`` ``circuits-native``).

Per-head weights are already ``[H, D, e]`` tensors, so per-destination q/k/v
inputs need only a transposed view. Bidirectional models (``causal=False``)
get a context whose mask hides padded keys only. Attention-only models
(``d_mlp = 0``) keep their MLP nodes: ``mlp`` returns ``0 * x``, an exact
zero that stays attached to the autograd graph, so the MLP destination still
receives a (zero) gradient and every edge into or out of ``mL`` scores 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Context, per_head_linear


class NativeAdapter(Adapter):
    model_types = {"circuits-native": "circuits.native models (tracr-compiled, toy; causal or bidirectional)"}
    position_limit = "n_positions"
    placeable = False  # the unembedding is the root module's own W_U: native models run on one device

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        cfg = self.config
        self.blocks = hf.blocks
        self.n_layers, self.n_heads, self.n_kv_heads = cfg.n_layers, cfg.n_heads, cfg.n_heads
        self.head_dim, self.d_model = cfg.d_head, cfg.d_model
        self.causal = bool(cfg.causal)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.embed_tokens(input_ids, position_ids)

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor) -> Context:
        if self.config.causal:
            return super().context(attention_mask, hidden, position_ids)
        seq = attention_mask.shape[1]
        return Context(attention_mask.bool()[:, None, None, :].expand(-1, 1, seq, seq), {}, None)

    def attention_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln1

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        attn = self.blocks[layer].attn
        weights = (attn.W_Q, attn.W_K, attn.W_V)
        biases = (attn.b_Q, attn.b_K, attn.b_V)
        if parts[0].shape[0] == 1:
            return tuple(
                torch.einsum("btd,hde->bhte", part[0], w) + b[None, :, None]
                for part, w, b in zip(parts, weights, biases, strict=True)
            )
        return tuple(
            per_head_linear(part, w.transpose(1, 2), b) for part, w, b in zip(parts, weights, biases, strict=True)
        )

    def scale(self, layer: int) -> float:
        return self.config.scale

    def out_weight(self, layer: int) -> torch.Tensor:
        return self.blocks[layer].attn.W_O

    def out_bias(self, layer: int) -> torch.Tensor | None:
        return self.blocks[layer].attn.b_O

    def out_projection(self, layer: int) -> nn.Module:
        raise NotImplementedError("native attention projects per head: use attention_output")

    def attention_output(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        attn = self.blocks[layer].attn
        return torch.einsum("bhte,hed->btd", z, attn.W_O) + attn.b_O

    mlp_hidden_paths = ("mlp.hidden",)

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        if block.mlp is None:
            return 0 * x
        return block.mlp(block.ln2(x))

    def final_norm(self) -> nn.Module:
        return self.hf.ln_final

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf.unembed(self.hf.ln_final(x))

    def output_size(self) -> int:
        return self.config.vocab_out
