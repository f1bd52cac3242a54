"""GPT-NeoX / Pythia: parallel attention + MLP, partial rotary, fused q/k/v laid out per head.

``query_key_value`` has weight ``[H * 3 * e, D]``: for each head, its q, k and
v rows in that order.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Context, per_head_linear, rotary_function


class NeoXAdapter(Adapter):
    model_types = {"gpt_neox": "GPT-NeoX, Pythia (parallel or sequential blocks, partial rotary, fused q/k/v per head)"}
    position_limit = "max_position_embeddings"

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.body = hf.gpt_neox
        self.blocks = self.body.layers
        cfg = self.config
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.n_kv_heads = self.n_heads
        self.d_model = cfg.hidden_size
        self.head_dim = self.d_model // self.n_heads
        self.parallel = bool(cfg.use_parallel_residual)
        self._apply_rotary = rotary_function(self.blocks[0].attention)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed_in(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.body.rotary_emb(hidden, position_ids=position_ids)

    def attention_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].input_layernorm

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        fused = self.blocks[layer].attention.query_key_value
        h, e = self.n_heads, self.head_dim
        if parts[0].shape[0] == 1 and parts[0] is parts[1] is parts[2]:  # the shared stream: the fused projection
            batch, seq = parts[0].shape[1:3]
            qkv = fused(parts[0][0]).view(batch, seq, h, 3 * e).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            weight = fused.weight.view(h, 3, e, self.d_model)
            bias = None if fused.bias is None else fused.bias.view(h, 3, e)
            q, k, v = (
                per_head_linear(part, weight[:, i], None if bias is None else bias[:, i])
                for i, part in enumerate(parts)
            )
        cos, sin = ctx.rotary
        q, k = self._apply_rotary(q, k, cos, sin)
        return q, k, v

    def scale(self, layer: int) -> float:
        return self.blocks[layer].attention.scaling

    def out_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].attention.dense

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(block.post_attention_layernorm(x))

    def final_norm(self) -> nn.Module:
        return self.body.final_layer_norm
