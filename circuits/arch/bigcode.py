"""GPT-BigCode (StarCoder 1, SantaCoder): GPT-2 with nn.Linear projections and a fused ``c_attn`` laid out per
key/value group: ``[all queries | k | v]`` with ``multi_query`` (one key/value head), ``[q, k, v]`` per head
without it."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Context
from .falcon import grouped_qkv
from .gpt2 import GPT2Adapter


class GPTBigCodeAdapter(GPT2Adapter):
    model_types = {"gpt_bigcode": "StarCoder 1, SantaCoder (GPT-2 with multi-query attention, or multi-head)"}

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.n_kv_heads = 1 if self.config.multi_query else self.n_heads

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        return grouped_qkv(self.blocks[layer].attn.c_attn, parts, self.n_heads, self.n_kv_heads)

    def scale(self, layer: int) -> float:
        return self.blocks[layer].attn.scaling

    out_weight = Adapter.out_weight  # c_proj is an nn.Linear, not GPT-2's Conv1D
