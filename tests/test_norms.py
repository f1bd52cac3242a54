"""Many destinations' gradients at a norm's input: written out where a formula reproduces autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.cohere.modeling_cohere import CohereLayerNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from circuits.arch import norms
from circuits.errors import CircuitsError

WIDTH = 16


def autograd_gradients(norm: nn.Module, stream: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Each gradient through the norm on its own (one backward per destination)."""
    rows = []
    for grad in grads:
        leaf = stream.detach().double().requires_grad_(True)
        (row,) = torch.autograd.grad(norm.double()(leaf), leaf, grad[None].double())
        rows.append(row[0])
    norm.float()
    return torch.stack(rows).float()


class OnePlusWeightRMSNorm(nn.Module):
    """An RMSNorm scaled by ``1 + w`` (as Gemma's)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.1)
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class CubeRootNorm(OnePlusWeightRMSNorm):
    """A norm with an RMSNorm's parameters and neither of its formulas."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).pow(1 / 3) + self.eps) * self.weight


def random_norm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    norm = {
        "layer": lambda: nn.LayerNorm(WIDTH),
        "rms": lambda: LlamaRMSNorm(WIDTH, eps=1e-6),
        "layer-without-bias": lambda: CohereLayerNorm(WIDTH, eps=1e-5),
        "one-plus-weight": lambda: OnePlusWeightRMSNorm(WIDTH),
        "other": lambda: CubeRootNorm(WIDTH),
    }[kind]()
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
    return norm


@pytest.mark.parametrize("kind", ["layer", "rms", "layer-without-bias", "one-plus-weight", "other"])
def test_gradients_at_the_norm_input_equal_one_backward_per_destination(kind):
    norm = random_norm(kind)
    stream, grads = torch.randn(1, 3, 5, WIDTH) * 2 + 0.5, torch.randn(7, 3, 5, WIDTH)
    got = norms.norm_input_gradients(norm, stream, grads)
    assert got.dtype == torch.float32 and got.shape == grads.shape
    assert torch.allclose(got, autograd_gradients(norm, stream, grads), atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "written_out"),
    [("layer", True), ("rms", True), ("layer-without-bias", True), ("one-plus-weight", True), ("other", False)],
)
def test_a_formula_is_used_only_for_a_norm_it_reproduces(kind, written_out, monkeypatch):
    calls = []
    original = norms._written_out
    monkeypatch.setattr(norms, "_VERIFIED", {})
    monkeypatch.setattr(norms, "_written_out", lambda *args: calls.append(len(args[3][0])) or original(*args))
    norms.norm_input_gradients(random_norm(kind), torch.randn(1, 2, 3, WIDTH), torch.randn(4, 2, 3, WIDTH))
    used = 4 in calls  # the checks against autograd take 2 gradients
    assert used == written_out


def test_the_identity_passes_the_gradients_through():
    grads = torch.randn(4, 2, 3, WIDTH)
    assert torch.equal(norms.norm_input_gradients(nn.Identity(), torch.randn(1, 2, 3, WIDTH), grads), grads)


@pytest.mark.parametrize("kind", ["rms", "one-plus-weight"])
def test_an_rms_norm_is_its_input_times_the_norm_factor(kind):
    norm, stream = random_norm(kind), torch.randn(3, 5, WIDTH) * 2 + 0.5
    with torch.no_grad():
        assert torch.allclose(stream * norms.norm_factor(norm, stream), norm(stream), atol=1e-6)


@pytest.mark.parametrize("kind", ["layer", "other"])
def test_a_norm_without_a_per_position_factor_is_refused_by_name(kind):
    norm = random_norm(kind)
    with pytest.raises(CircuitsError, match=type(norm).__name__):
        norms.norm_factor(norm, torch.randn(3, 5, WIDTH))
