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
    Qwen2Config,
    Qwen3Config,
)

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
    "neox": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.5, use_parallel_residual=True),
    "neox_sequential": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.25, use_parallel_residual=False),
}
ARCHITECTURES = sorted(CONFIGS)


def tiny_hf(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random HF causal LM of architecture ``name`` (one of ``ARCHITECTURES``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown tiny architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
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
