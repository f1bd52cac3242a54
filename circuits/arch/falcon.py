"""Falcon: one fused ``query_key_value`` laid out per key/value group, rotary or ALiBi positions, parallel or
sequential blocks.

Every fused q/k/v layout of Falcon, BLOOM and GPT-BigCode is one layout, *per key/value group*: the group's
query heads, then its key, then its value (``grouped_qkv``). Ordinary multi-head attention is one group per
head (``[q, k, v]`` per head, as GPT-NeoX), multi-query attention one group (``[all queries | k | v]``),
Falcon's new decoder architecture ``num_kv_heads`` groups.

ALiBi adds ``slope_h * (key position)`` to the scores; positions come from the attention mask's cumulative
sum as transformers computes them (for right padding: ``arange`` over the real tokens), through the modeling
file's own ``build_alibi_tensor`` so that its rounding is the same (Falcon rounds the slopes to bfloat16 and
divides the bias by ``sqrt(head_dim)``; BLOOM does neither).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..errors import CircuitsError
from .base import Adapter, Context, per_head_linear, rotary_function


def grouped_qkv(
    fused: nn.Linear, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_heads: int, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, H, T, e]``, k and v ``[B, G, T, e]`` from a fused projection laid out per key/value group.

    ``parts`` are the shared normed stream (one ``[1, B, T, D]`` tensor three times: the fused module runs) or
    one input per destination (``[H, ...]``, ``[G, ...]``, ``[G, ...]``: views of the weight per head).
    """
    per_group = n_heads // n_groups
    d = fused.weight.shape[1]
    e = fused.weight.shape[0] // (n_groups * (per_group + 2))
    if parts[0].shape[0] == 1 and parts[0] is parts[1] is parts[2]:
        batch, seq = parts[0].shape[1:3]
        y = fused(parts[0][0]).view(batch, seq, n_groups, per_group + 2, e)
        q = y[..., :per_group, :].reshape(batch, seq, n_heads, e)
        return q.transpose(1, 2), y[..., per_group, :].transpose(1, 2), y[..., per_group + 1, :].transpose(1, 2)
    weight = fused.weight.view(n_groups, per_group + 2, e, d)
    bias = None if fused.bias is None else fused.bias.view(n_groups, per_group + 2, e)

    def rows(index):  # the weight and bias rows of one slot of every group
        return weight[:, index], None if bias is None else bias[:, index]

    q_weight, q_bias = rows(slice(0, per_group))
    q = per_head_linear(
        parts[0], q_weight.reshape(n_heads, e, d), None if q_bias is None else q_bias.reshape(n_heads, e)
    )
    return q, per_head_linear(parts[1], *rows(per_group)), per_head_linear(parts[2], *rows(per_group + 1))


def padding_mask(ctx: Context) -> torch.Tensor:
    """The batch's ``[B, T]`` attention mask (1 for real tokens), read back from the causal mask's last row."""
    return ctx.attention_mask[:, 0, -1, :].long()


def refuse(config, field: str, reason: str) -> None:
    raise CircuitsError(
        f"model_type {config.model_type!r} with {field}={getattr(config, field, None)!r} is not supported: {reason}"
    )


class FalconAdapter(Adapter):
    model_types = {
        "falcon": "Falcon 7B/40B/180B, Falcon-RW (fused q/k/v per key/value group: multi-query, grouped or "
        "multi-head; parallel or sequential blocks; rotary or ALiBi)"
    }
    position_limit = "max_position_embeddings"

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.body = hf.transformer
        self.blocks = self.body.h
        cfg = self.config
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.d_model = cfg.hidden_size
        self.head_dim = self.d_model // self.n_heads
        self._setup()

    def _setup(self) -> None:
        """Falcon's variants: key/value groups, which norms feed attention and MLP, parallel blocks."""
        cfg = self.config
        new = cfg.new_decoder_architecture
        if new and not cfg.parallel_attn:
            refuse(
                cfg,
                "parallel_attn",
                "with new_decoder_architecture, transformers' FalconDecoderLayer builds no ln_attn/ln_mlp for "
                "sequential blocks and its forward fails",
            )
        if not new and cfg.parallel_attn and cfg.num_ln_in_parallel_attn == 2:
            refuse(
                cfg,
                "num_ln_in_parallel_attn",
                "without new_decoder_architecture, transformers' forward reads input_layernorm, which "
                "FalconDecoderLayer does not build for two parallel norms",
            )
        if not new and not cfg.multi_query and cfg.num_kv_heads != cfg.num_attention_heads:
            refuse(
                cfg,
                "num_kv_heads",
                "the old architecture without multi_query projects one key/value per query head, and "
                "transformers' FalconAttention repeats them num_attention_heads / num_kv_heads times (a shape error)",
            )
        self._apply_rotary = rotary_function(self.blocks[0].self_attention)
        self._build_alibi = sys.modules[type(self.body).__module__].build_alibi_tensor
        self.n_kv_heads = cfg.num_kv_heads if new else 1 if cfg.multi_query else self.n_heads
        self.parallel = bool(new or cfg.parallel_attn)
        if new and cfg.num_ln_in_parallel_attn in (None, 2):
            self._norms = ("ln_attn", "ln_mlp")
        else:
            self._norms = ("input_layernorm", "input_layernorm" if self.parallel else "post_attention_layernorm")

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.word_embeddings(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return None if self.config.alibi else self.body.rotary_emb(hidden, position_ids=position_ids)

    def score_bias(self, layer: int, ctx: Context) -> torch.Tensor | None:
        if not self.config.alibi:
            return None
        mask = padding_mask(ctx)
        alibi = self._build_alibi(mask, self.n_heads, self.body.word_embeddings.weight.dtype)
        return alibi.view(mask.shape[0], self.n_heads, 1, -1) / math.sqrt(self.head_dim)

    def attention_norm(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self._norms[0])

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        q, k, v = grouped_qkv(self.blocks[layer].self_attention.query_key_value, parts, self.n_heads, self.n_kv_heads)
        if ctx.rotary is not None:
            q, k = self._apply_rotary(q, k, *ctx.rotary)
        return q, k, v

    def scale(self, layer: int) -> float:
        return self.blocks[layer].self_attention.scaling

    def out_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].self_attention.dense

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(getattr(block, self._norms[1])(x))

    def final_norm(self) -> nn.Module:
        return self.body.ln_f
