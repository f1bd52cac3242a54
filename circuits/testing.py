"""Tiny random models of every supported architecture, for tests, examples and checks.

Each is a real HF model class built from a small config (3 layers, d_model 32,
4 heads), with weights large enough that attention is far from uniform and
every bias and norm weight perturbed, so that a mistake anywhere shows up in
the logits.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    CohereConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTBigCodeConfig,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXConfig,
    GptOssConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoConfig,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
    StableLmConfig,
    Starcoder2Config,
)

from .errors import CircuitsError

VOCAB = 61
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
_GEMMA3_TEXT = dict(
    _COMMON,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=12,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_theta=10000.0,
    rope_local_base_freq=100.0,
)
# mixtures of experts: 4 experts, top 2; transformers' default "grouped_mm" experts have no float64 CPU kernel
_MOE = dict(num_experts_per_tok=2, experts_implementation="eager")
_QWEN_MOE = dict(_MOE, num_experts=4, moe_intermediate_size=16, use_sliding_window=True, sliding_window=4)
_FALCON = dict(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=48, num_hidden_layers=3, num_attention_heads=4)
_BIGCODE = dict(
    vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
)

CONFIGS = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=5),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=1, head_dim=8),
    "smollm3": lambda: SmolLM3Config(
        **_COMMON, num_key_value_heads=2, no_rope_layers=[1, 0, 1], pad_token_id=0, bos_token_id=0, eos_token_id=0
    ),
    # clip_qkv clips some projections of these weights, rarely enough for finite differences to see no kink
    "olmo": lambda: OlmoConfig(**_COMMON, num_key_value_heads=2, clip_qkv=3.0),
    "olmo2": lambda: Olmo2Config(**_COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "olmoe": lambda: OlmoeConfig(
        **_COMMON,
        **_MOE,
        num_key_value_heads=2,
        num_experts=4,
        norm_topk_prob=True,
        clip_qkv=2.5,
        attention_bias=True,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "granite": lambda: GraniteConfig(
        **_COMMON,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        embedding_multiplier=1.7,
        residual_multiplier=0.6,
        attention_multiplier=0.3,
        logits_scaling=2.5,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "cohere": lambda: CohereConfig(
        **_COMMON, num_key_value_heads=2, attention_bias=True, logit_scale=0.5, bos_token_id=0, eos_token_id=0
    ),
    "cohere_qk_norm": lambda: CohereConfig(
        **_COMMON, num_key_value_heads=2, use_qk_norm=True, logit_scale=0.5, bos_token_id=0, eos_token_id=0
    ),
    "stablelm": lambda: StableLmConfig(**_COMMON, num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True),
    "stablelm_parallel_qk_norm": lambda: StableLmConfig(
        **_COMMON,
        num_key_value_heads=2,
        partial_rotary_factor=0.5,
        use_qkv_bias=True,
        qk_layernorm=True,
        use_parallel_residual=True,
    ),
    "starcoder2": lambda: Starcoder2Config(**_COMMON, num_key_value_heads=2, sliding_window=5, use_bias=True),
    "neox": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.5, use_parallel_residual=True),
    "neox_sequential": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.25, use_parallel_residual=False),
    "mixtral": lambda: MixtralConfig(**_COMMON, **_MOE, num_experts=4, num_key_value_heads=2, sliding_window=5),
    # a shared expert with its sigmoid gate, layer 1 a dense MLP, q/k/v biases, layers 0 and 2 windowed
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **_COMMON, **_QWEN_MOE, num_key_value_heads=2, shared_expert_intermediate_size=24, mlp_only_layers=[1]
    ),
    # layer 0 a dense MLP, renormalised top-k weights, q/k/v/o biases, one window for every layer
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **_COMMON, **_QWEN_MOE, num_key_value_heads=1, norm_topk_prob=True, mlp_only_layers=[0], attention_bias=True
    ),
    # Gemma: multi-query attention, heads * head_dim (48) != d_model, q/k/v/o biases; embeddings scaled, 1 + w
    # norms, GeGLU
    "gemma": lambda: GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=12, attention_bias=True),
    # norms around attention and MLP; scores capped at 5 and logits at 3 (both bend them), a scale from
    # query_pre_attn_scalar (12) != head_dim (8), windows of 4 on layers 0 and 2 (the default alternation)
    "gemma2": lambda: Gemma2Config(
        **_COMMON,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        sliding_window=4,
    ),
    # q/k norms, local rotary base (100) != global (10000), windows of 4 on layers 0 and 2
    "gemma3_text": lambda: Gemma3TextConfig(**_GEMMA3_TEXT),
    # the multimodal Gemma 3 on text: its language model (as gemma3_text's) under a tiny unused vision tower
    "gemma3": lambda: Gemma3Config(
        text_config=_GEMMA3_TEXT | dict(initializer_range=0.3),
        vision_config=dict(
            hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        ),
        mm_tokens_per_image=4,
        image_token_index=60,
        boi_token_index=58,
        eoi_token_index=59,
    ),
    # sinks, layers 0 and 2 windowed, q/k/v/o biases, YaRN rotary; the SwiGLU clamp at 4 clamps about 2% of the
    # experts' units. (With these weights, EAP's first-order check with a shrunk corruption crosses a jump of the
    # top-2 routing, a near tie in layer 2, at the default clamp 7, and many clamp kinks at 3.)
    "gpt_oss": lambda: GptOssConfig(
        **_COMMON, **_MOE, num_experts=4, num_key_value_heads=2, head_dim=8, sliding_window=4, swiglu_limit=4.0
    ),
    # parallel blocks, grouped-query attention, q/k/v biases, rotary on half of each head (on 6 of 8 with q/k norms)
    "phi": lambda: PhiConfig(**_COMMON, num_key_value_heads=2, partial_rotary_factor=0.5),
    "phi_qk_norm": lambda: PhiConfig(**_COMMON, num_key_value_heads=2, partial_rotary_factor=0.75, qk_layernorm=True),
    # fused qkv_proj with grouped-query attention, rotary on half of each head, a window of 5 on every layer
    "phi3": lambda: Phi3Config(
        **_COMMON,
        num_key_value_heads=2,
        partial_rotary_factor=0.5,
        sliding_window=5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # parallel blocks, interleaved rotary on 4 of each head's 8 dimensions
    "gptj": lambda: GPTJConfig(**_BIGCODE, rotary_dim=4),
    # unscaled attention; layers 0 and 2 local (window 4)
    "gpt_neo": lambda: GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=3,
        num_heads=4,
        max_position_embeddings=64,
        attention_types=[[["local", "global"], 1], [["local"], 1]],
        window_size=4,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # pre-LN, biases, word embeddings of width 16 (project_in, project_out)
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
    ),
    # new decoder architecture: 2 key/value groups of 2 query heads, rotary, parallel blocks with ln_attn/ln_mlp
    "falcon": lambda: FalconConfig(**_FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True),
    # Falcon-7B: one key/value head ([all queries | k | v]), parallel blocks with one shared norm, no biases
    "falcon_multi_query": lambda: FalconConfig(**_FALCON, multi_query=True, parallel_attn=True),
    # Falcon-RW: multi-head ([q, k, v] per head), sequential blocks, ALiBi, biases
    "falcon_sequential_alibi": lambda: FalconConfig(
        **_FALCON, multi_query=False, parallel_attn=False, alibi=True, bias=True
    ),
    # ALiBi, LayerNorm after the embeddings; pretraining_tp without slow_but_exact changes nothing
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4, pretraining_tp=2),
    "gpt_bigcode": lambda: GPTBigCodeConfig(**_BIGCODE, multi_query=True),
    "gpt_bigcode_mha": lambda: GPTBigCodeConfig(**_BIGCODE, multi_query=False),
}
ARCHITECTURES = sorted(CONFIGS)


def tiny_hf(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random HF causal LM of architecture ``name`` (one of ``ARCHITECTURES``)."""
    if name not in CONFIGS:
        raise CircuitsError(f"unknown tiny architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config.initializer_range = 0.3
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return hf.eval()


WORDS = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park"]


def tiny_tokenizer():
    """A whitespace word-level tokenizer over ``WORDS`` plus ``w11`` ... ``w60`` (ids match ``VOCAB``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(len(WORDS), VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


def tiny_pair(batch: int = 4, seq: int = 9, seed: int = 1, lengths: list[int] | None = None):
    """Clean and corrupted token ids, equal length per pair, right-padded with 0, and the attention mask.

    A corrupted prompt changes about a third of its clean prompt's positions.
    """
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    corrupted = clean.clone()
    lengths = lengths or [seq - (i % 3) for i in range(batch)]
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    for i, length in enumerate(lengths):
        positions = torch.randperm(length, generator=generator)[: max(1, length // 3)]
        corrupted[i, positions] = torch.randint(0, VOCAB, (len(positions),), generator=generator)
    clean[mask == 0] = 0
    corrupted[mask == 0] = 0
    return clean, corrupted, mask


def tiny_task(batch: int = 6, seed: int = 1, metric: str = "logit_diff", name: str = "tiny", seq: int = 8):
    """A ``Task`` of token ids from ``tiny_pair``: answer the clean prompt's first token, against another."""
    from .task import Task

    clean, corrupted, mask = tiny_pair(batch=batch, seq=seq, seed=seed)
    lengths = mask.sum(1).tolist()
    clean_ids = [row[:n].tolist() for row, n in zip(clean, lengths, strict=True)]
    corrupted_ids = [row[:n].tolist() for row, n in zip(corrupted, lengths, strict=True)]
    answers = [int(row[0]) for row in clean]
    wrong = [(answer + 7) % 60 + 1 for answer in answers]
    return Task.from_token_ids(name, clean_ids, corrupted_ids, answers, wrong, metric=metric)


# --- native models (circuits.native), for the same invariants --------------------------------------

NATIVE_CONFIGS = {
    "native-attn-only": dict(d_mlp=0, n_positions=16, layer_norm=False, causal=True),
    "native-mlp-ln": dict(d_mlp=48, n_positions=16, layer_norm=True, causal=True),
    "native-bidirectional": dict(d_mlp=40, n_positions=16, layer_norm=False, causal=False, d_head=6),
    "native-bidirectional-nopos": dict(
        d_mlp=40, n_positions=0, layer_norm=False, causal=False, attn_scale=1.0, d_vocab_out=13
    ),
}
NATIVE_ARCHITECTURES = sorted(NATIVE_CONFIGS)


def tiny_native(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``NativeTransformer`` (3 layers, d_model 32, 4 heads, vocabulary ``VOCAB``).

    Weights are scaled so that logits stay of order 1 without norms while attention is far
    from uniform; every bias is non-zero.
    """
    from .native import NativeConfig, NativeTransformer

    if name not in NATIVE_CONFIGS:
        raise CircuitsError(f"unknown tiny native model {name!r}; choose from {', '.join(NATIVE_ARCHITECTURES)}")
    options = dict(vocab_size=VOCAB, n_layers=3, d_model=32, n_heads=4, d_head=8) | NATIVE_CONFIGS[name]
    config = NativeConfig(**options)
    torch.manual_seed(seed)
    model = NativeTransformer(config)
    d, e, h = config.d_model, config.d_head, config.n_heads
    query_key = (2 / d) ** 0.5 * (e**-0.25 if config.attn_scale == 1.0 else 1.0)  # scores of order 1-3
    scales = {"W_Q": query_key, "W_K": query_key, "W_V": d**-0.5, "W_O": 0.5 * (e * h) ** -0.5, "W_U": d**-0.5}
    scales |= {"W_in": d**-0.5, "W_out": 0.5 * max(config.d_mlp, 1) ** -0.5}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 0.7)
            else:
                for key, parameter in module.named_parameters(recurse=False):
                    parameter.normal_(0.0, scales[key] if key in scales else 0.1)  # biases: 0.1
    return model.eval()
