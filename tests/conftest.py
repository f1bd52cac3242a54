"""Tiny random models of every supported architecture, and batches to run them on."""

from __future__ import annotations

import pytest
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

import circuits

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)

CONFIGS = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=5),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=8),
    "neox": lambda: GPTNeoXConfig(**COMMON, rotary_pct=0.5, use_parallel_residual=True),
    "neox_sequential": lambda: GPTNeoXConfig(**COMMON, rotary_pct=0.25, use_parallel_residual=False),
}
ARCHITECTURES = sorted(CONFIGS)


def make_hf(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config.initializer_range = 0.3  # large enough weights that attention is far from uniform
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves biases and norm weights at 0/1; perturb every parameter so that
    # a mistake in how a bias or a norm is applied shows up in the logits.
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return hf.eval()


@pytest.fixture(scope="session", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny(arch) -> circuits.Model:
    return circuits.Model.from_hf(make_hf(arch), name=f"tiny-{arch}")


def make_pair(batch: int = 4, seq: int = 9, seed: int = 1, lengths: list[int] | None = None):
    """Clean and corrupted ids of equal per-pair length, right-padded, plus the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    corrupted = clean.clone()
    lengths = lengths or [seq - (i % 3) for i in range(batch)]
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    for i, length in enumerate(lengths):
        # change a few positions, as a corrupted prompt does
        positions = torch.randperm(length, generator=generator)[: max(1, length // 3)]
        corrupted[i, positions] = torch.randint(0, VOCAB, (len(positions),), generator=generator)
    pad = 0
    clean[mask == 0] = pad
    corrupted[mask == 0] = pad
    return clean, corrupted, mask


@pytest.fixture(scope="session")
def pair():
    return make_pair()
