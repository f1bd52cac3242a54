"""GPT-2: learned positions, fused ``c_attn`` (Conv1D, weight ``[D, 3D]``), sequential blocks."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Context, per_head_linear, split_heads


class GPT2Adapter(Adapter):
    model_types = {"gpt2": "GPT-2 (learned positions, fused Conv1D q/k/v, scaled by layer index if configured)"}
    position_limit = "n_positions"

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.body = hf.transformer
        self.blocks = self.body.h
        cfg = self.config
        self.n_layers, self.n_heads = cfg.n_layer, cfg.n_head
        self.n_kv_heads = self.n_heads
        self.d_model = cfg.n_embd
        self.head_dim = self.d_model // self.n_heads

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.wte(input_ids) + self.body.wpe(position_ids)

    def input_modules(self) -> list[nn.Module]:
        return [self.body.wte, self.body.wpe]

    def attention_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln_1

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        block = self.blocks[layer]
        d, h = self.d_model, self.n_heads
        if parts[0].shape[0] == 1 and parts[0] is parts[1] is parts[2]:  # the shared stream: the fused projection
            q, k, v = block.attn.c_attn(parts[0][0]).split(d, dim=-1)
            return split_heads(q, h), split_heads(k, h), split_heads(v, h)
        weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # [D, 3D], [3D]
        return tuple(
            per_head_linear(
                part,
                weight[:, i * d : (i + 1) * d].view(d, h, self.head_dim).permute(1, 2, 0),
                bias[i * d : (i + 1) * d].view(h, self.head_dim),
            )
            for i, part in enumerate(parts)
        )

    def scale(self, layer: int) -> float:
        scale = self.head_dim**-0.5 if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale

    def out_weight(self, layer: int) -> torch.Tensor:
        return self.blocks[layer].attn.c_proj.weight.view(self.n_heads, self.head_dim, self.d_model)

    def out_bias(self, layer: int) -> torch.Tensor | None:
        return self.blocks[layer].attn.c_proj.bias

    def out_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].attn.c_proj

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(block.ln_2(x))

    def final_norm(self) -> nn.Module:
        return self.body.ln_f
