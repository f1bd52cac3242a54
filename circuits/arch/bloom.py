"""BLOOM: Falcon's module layout with ALiBi always, q/k/v fused per head, sequential blocks, and a LayerNorm
after the word embeddings (part of the ``input`` source).

``apply_residual_connection_post_layernorm`` (the residual is the *normed* stream) is refused: the stream is
then no sum of source outputs. ``pretraining_tp > 1`` with ``slow_but_exact`` computes the attention output
and the MLP's last projection in slices and, in transformers, leaves their biases out: so does this adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CircuitsError
from .base import Context
from .falcon import FalconAdapter, padding_mask, refuse


class BloomAdapter(FalconAdapter):
    model_types = {
        "bloom": "BLOOM, BLOOMZ (ALiBi, q/k/v fused per head, LayerNorm after the embeddings; "
        "pretraining_tp slices with slow_but_exact)"
    }
    position_limit = None  # ALiBi: no declared maximum

    def _setup(self) -> None:
        cfg = self.config
        if cfg.apply_residual_connection_post_layernorm:
            refuse(
                cfg,
                "apply_residual_connection_post_layernorm",
                "each block's residual is the normed stream, so the stream is not a sum of source outputs and "
                "edges have no exact decomposition",
            )
        self.n_kv_heads = self.n_heads
        self._norms = ("input_layernorm", "post_attention_layernorm")
        # transformers' slow_but_exact path adds the sliced products and no bias (attention output and MLP)
        self._no_out_bias = cfg.pretraining_tp > 1 and cfg.slow_but_exact

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.word_embeddings_layernorm(self.body.word_embeddings(input_ids))

    def input_modules(self) -> list[nn.Module]:
        return [self.body.word_embeddings, self.body.word_embeddings_layernorm]

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return None

    def score_bias(self, layer: int, ctx: Context) -> torch.Tensor:
        mask = padding_mask(ctx)
        alibi = self.body.build_alibi_tensor(mask, self.n_heads, self.body.word_embeddings.weight.dtype)
        return alibi.view(mask.shape[0], self.n_heads, 1, -1)

    def scale(self, layer: int) -> float:
        return self.blocks[layer].self_attention.inv_norm_factor

    def out_bias(self, layer: int) -> torch.Tensor | None:
        return None if self._no_out_bias else self.out_projection(layer).bias

    def attention_output(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        batch, _, seq, _ = z.shape
        return F.linear(
            z.transpose(1, 2).reshape(batch, seq, -1), self.out_projection(layer).weight, self.out_bias(layer)
        )

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        mlp = block.mlp
        hidden = mlp.gelu_impl(mlp.dense_h_to_4h(block.post_attention_layernorm(x)))
        out = mlp.dense_4h_to_h
        if not self._no_out_bias:
            return out(hidden)  # the module itself: its input hook point holds the hidden units
        return F.linear(hidden, out.weight, None)

    def mlp_hidden_module(self, layer: int) -> nn.Module:
        if self._no_out_bias:
            raise CircuitsError(
                "bloom with pretraining_tp > 1 and slow_but_exact applies its MLP output projection in slices, not "
                "as the module whose input the hidden units are: the mlp-neuron level is not available"
            )
        return super().mlp_hidden_module(layer)
