"""OPT (pre-LN): learned positions with an offset of 2, separate q/k/v and ``out_proj`` with biases, the MLP as
``fc1``/``fc2`` of the decoder layer after ``final_layer_norm``, and when ``word_embed_proj_dim`` differs from
``hidden_size`` a ``project_in`` after the token embedding (part of the ``input`` source) and a ``project_out``
before ``lm_head`` (part of the unembedding).

HF scales the query (bias included) by ``head_dim ** -0.5`` before the dot product; so does this adapter, and the
attention itself is unscaled. Positions are the attention mask's cumulative sum in HF: with right padding, the
real tokens' positions are ``arange + 2`` (the padding's differ, and nothing real reads it).

Post-LN OPT (``do_layer_norm_before=False``, OPT-350m) normalises the whole residual stream after every
sublayer: the stream is not a sum of source outputs, so it is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CircuitsError
from .base import Adapter, Context
from .gptj import SeparateQKV


class OPTAdapter(SeparateQKV, Adapter):
    model_types = {"opt": "OPT with pre-LN (learned positions offset by 2, project_in/out); post-LN OPT-350m refused"}
    position_limit = "max_position_embeddings"
    mlp_hidden_paths = ("fc2",)  # the MLP's layers sit on the decoder layer itself

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        cfg = self.config
        if not cfg.do_layer_norm_before:
            raise CircuitsError(
                f"model_type {cfg.model_type!r} with do_layer_norm_before=False (post-LN, e.g. OPT-350m) is not "
                "supported: its LayerNorms normalise the whole residual stream after each sublayer, so the stream "
                "is not a sum of source outputs and edges have no exact decomposition"
            )
        self.body = hf.model.decoder
        self.blocks = self.body.layers
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.n_kv_heads = self.n_heads
        self.d_model = cfg.hidden_size
        self.head_dim = self.d_model // self.n_heads

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.body.embed_tokens(input_ids)
        if self.body.project_in is not None:
            tokens = self.body.project_in(tokens)
        return tokens + self.body.embed_positions(None, position_ids=position_ids)  # adds the offset of 2

    def input_modules(self) -> list[nn.Module]:
        modules = [self.body.embed_tokens, self.body.embed_positions]
        return modules if self.body.project_in is None else [*modules, self.body.project_in]

    def attention_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].self_attn_layer_norm

    def after_projection(self, layer: int, q, k, v, ctx: Context):
        return q * self.attention(layer).scaling, k, v

    def scale(self, layer: int) -> float:
        return 1.0  # the query is scaled already

    def out_projection(self, layer: int) -> nn.Module:
        return self.attention(layer).out_proj

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.fc2(block.activation_fn(block.fc1(block.final_layer_norm(x))))

    def final_norm(self) -> nn.Module:
        norm = self.body.final_layer_norm
        return nn.Identity() if norm is None else norm

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_norm()(x)
        if self.body.project_out is not None:
            x = self.body.project_out(x)
        return self.hf.get_output_embeddings()(x)
