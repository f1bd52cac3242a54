"""The Gemma family, as declared differences of the Llama family: Gemma, Gemma 2, Gemma 3 (the text model, and
the text path of the multimodal model).

- The embedding is scaled by sqrt(d_model), rounded to the model's dtype (HF's scaled embedding module; older
  transformers multiplied in the model's forward).
- RMSNorms weigh by 1 + w (``circuits.arch.norms`` writes that form out, gradients included).
- Gemma 2/3 norm the attention output before it joins the stream (``post_attention_layernorm``, each head's share
  through the norm's per-position factor) and wrap the MLP in two norms (``pre_feedforward_layernorm`` and
  ``post_feedforward_layernorm``: both belong to the MLP source); Gemma's post-attention norm is the MLP's pre-norm.
- Gemma 2 soft-caps the attention scores; Gemma 2 and the Gemma 3 text model soft-cap the final logits.
- The attention scale is ``query_pre_attn_scalar ** -0.5`` (Gemma 2/3; the attention module's own ``scaling``).
- Sliding windows per ``layer_types``; Gemma 3 has per-head q/k RMSNorms and a rotary table per kind of layer
  (local and global bases), so ``ctx.rotary`` is a dict keyed by layer type.
- The GeGLU MLP is HF's own module.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import CircuitsError
from .base import Context
from .llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    model_types = {
        "gemma": "Gemma (embeddings scaled by sqrt(d_model), 1 + w RMSNorms, GeGLU MLP)",
        "gemma2": "Gemma 2 (norms around attention and MLP, soft-capped scores and logits, alternating windows)",
        "gemma3_text": "Gemma 3 text models, e.g. Gemma-3-270m (q/k norms, local and global rotary bases)",
        "gemma3": "Gemma 3 multimodal models, on text only (their language model and head)",
    }

    def __init__(self, hf: nn.Module):
        config = hf.config.get_text_config()
        if getattr(config, "use_bidirectional_attention", False):
            raise CircuitsError(
                f"model_type {hf.config.model_type!r}: use_bidirectional_attention is set: every position reads "
                "later ones, and transformers' masks for it differ between attention kernels; circuits needs the "
                "causal language model"
            )
        # the multimodal Gemma 3 keeps its language model (and its text config) one level down
        body = hf.model.language_model if hf.config.model_type == "gemma3" else hf.model
        super().__init__(SimpleNamespace(config=config, model=body))  # Llama's fields, from the text model
        self.hf = hf
        self.sandwich = hasattr(self.blocks[0], "post_feedforward_layernorm")  # Gemma 2/3: norms after attn/MLP
        if self.sandwich and self.out_bias(0) is not None:
            raise CircuitsError(
                f"model_type {hf.config.model_type!r}: attention_bias is set: the attention output bias passes "
                "through post_attention_layernorm, whose per-position factor depends on every head, so its share "
                "belongs to no head and is no constant of the stream; this configuration is not supported"
            )
        # transformers' Gemma 3 attention never passes its config's attn_logit_softcapping on (nor does the
        # multimodal head apply final_logit_softcapping): the engine computes what the HF model computes
        self.attention_cap = config.attn_logit_softcapping if config.model_type == "gemma2" else None
        self.logit_cap = None if hf.config.model_type == "gemma3" else getattr(config, "final_logit_softcapping", None)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embedding = self.body.embed_tokens
        hidden = embedding(input_ids)
        if not hasattr(embedding, "embed_scale"):  # transformers < 5 scaled in the model's forward
            hidden = hidden * torch.tensor(self.d_model**0.5, dtype=hidden.dtype)
        return hidden

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        rotary = self.body.rotary_emb
        if hasattr(rotary, "layer_types"):  # Gemma 3: one table per kind of layer, each with its own base
            return {kind: rotary(hidden, position_ids, kind) for kind in sorted(set(self.config.layer_types))}
        local = getattr(self.body, "rotary_emb_local", None)
        if local is not None:  # Gemma 3 before transformers 5: a second module for the sliding layers
            return {"full_attention": rotary(hidden, position_ids), "sliding_attention": local(hidden, position_ids)}
        return rotary(hidden, position_ids)

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        if isinstance(ctx.rotary, dict):  # this layer's table
            ctx = replace(ctx, rotary=ctx.rotary[self.config.layer_types[layer]])
        return super().project_qkv(layer, parts, ctx)

    def score_softcap(self, layer: int) -> float | None:
        return self.attention_cap

    def post_attention_norm(self, layer: int) -> nn.Module | None:
        return self.blocks[layer].post_attention_layernorm if self.sandwich else None

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if not self.sandwich:
            return super().mlp(layer, x)
        block = self.blocks[layer]
        return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x)))

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().unembed(x)
        cap = self.logit_cap
        return logits if cap is None else torch.tanh(logits / cap) * cap
