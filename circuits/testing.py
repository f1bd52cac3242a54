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
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OlmoConfig,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
    Starcoder2Config,
)

from .errors import CircuitsError

VOCAB = 61
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)

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
    "starcoder2": lambda: Starcoder2Config(**_COMMON, num_key_value_heads=2, sliding_window=5, use_bias=True),
    "neox": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.5, use_parallel_residual=True),
    "neox_sequential": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.25, use_parallel_residual=False),
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
