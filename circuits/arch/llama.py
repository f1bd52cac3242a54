"""The Llama family: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), SmolLM2, SmolLM3
(layers without rotary positions), OLMo (weightless LayerNorms, q/k/v clipped to +-clip_qkv), StarCoder2
(LayerNorms and projections with biases, a two-matrix MLP: the MLP is the block's own module either way).

RMSNorm, rotary positions through transformers' own helpers, separate
q/k/v projections, grouped-query attention with k/v per key/value head.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Context, project_heads, rotary_function


class LlamaAdapter(Adapter):
    model_types = {
        "llama": "Llama 2/3, SmolLM2 (RMSNorm, rotary, grouped-query attention)",
        "mistral": "Mistral (one sliding window for every layer)",
        "qwen2": "Qwen2, Qwen2.5 (q/k/v biases; sliding windows per layer type)",
        "qwen3": "Qwen3 (per-head q/k RMSNorms)",
        "smollm3": "SmolLM3 (layers without rotary positions)",
        "olmo": "OLMo 1 (weightless LayerNorms, q/k/v clipped to +-clip_qkv)",
        "starcoder2": "StarCoder2 (LayerNorms and biases, a sliding window, two-matrix MLP)",
    }
    position_limit = "max_position_embeddings"

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        self.body = hf.model
        self.blocks = self.body.layers
        cfg = self.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self._apply_rotary = rotary_function(self.blocks[0].self_attn)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.body.rotary_emb(hidden, position_ids)

    def window(self, layer: int) -> int | None:
        cfg = self.config
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types:
            return cfg.sliding_window if layer_types[layer] == "sliding_attention" else None
        if cfg.model_type in ("mistral", "starcoder2"):  # one window for every layer, when set
            return getattr(cfg, "sliding_window", None)
        return None

    def attention_norm(self, layer: int) -> nn.Module:
        return self.blocks[layer].input_layernorm

    def project_qkv(self, layer: int, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ctx: Context):
        attn = self.blocks[layer].self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (project_heads(part, p, n) for part, p, n in zip(parts, projections, self.qkv_counts(), strict=True))
        clip = getattr(self.config, "clip_qkv", None)
        if clip is not None:  # OLMo: every projection clipped elementwise (per head alike)
            q, k, v = (x.clamp(-clip, clip) for x in (q, k, v))
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's query and key
            q, k = attn.q_norm(q), attn.k_norm(k)
        if getattr(attn, "use_rope", True):  # SmolLM3 leaves rotary positions out of some layers
            cos, sin = ctx.rotary
            q, k = self._apply_rotary(q, k, cos, sin)
        return q, k, v

    def scale(self, layer: int) -> float:
        return self.blocks[layer].self_attn.scaling

    def out_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].self_attn.o_proj

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return block.mlp(block.post_attention_layernorm(x))

    def final_norm(self) -> nn.Module:
        return self.body.norm
