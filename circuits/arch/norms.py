"""Many destinations' gradients at the input of one norm, in a few passes.

A layer's q/k/v destinations read one stream through one norm. The backward gives each of the n destinations
its own gradient at that stream: the norm's vector-Jacobian product, applied to n gradients at its output.
For the norms of the supported families, ``LayerNorm`` and RMSNorm (``w * x / rms(x)``), it is written out in
float32, a few passes over the n gradients; the identity passes them through; any other norm goes through
autograd, batched (correct, and several times slower). A written-out formula is used for a norm class only
after it has reproduced autograd's on a random input, so a norm that merely looks like one (Gemma's
``(1 + w)``, say) takes the autograd path rather than a wrong formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import CircuitsError

_VERIFIED: dict[tuple[type, str], bool] = {}  # (norm class, formula) -> reproduces autograd


def norm_input_gradients(
    norm: nn.Module, stream: torch.Tensor, output_grads: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """``[n, B, T, D]`` float32: the gradient at the norm's input ``stream`` (``[1, B, T, D]``) for each of the
    n gradients at its output ``output_grads`` (one ``[n, B, T, D]`` tensor, or blocks of them along n, which
    are written into the result as they are read rather than concatenated first)."""
    blocks = (output_grads,) if isinstance(output_grads, torch.Tensor) else tuple(output_grads)
    if isinstance(norm, nn.Identity):
        return _stacked(blocks)
    for formula in _formulas(norm, stream.shape[-1]):
        if _reproduces_autograd(norm, formula, stream):
            return _written_out(norm, formula, stream, blocks)
    return _by_autograd(norm, stream, torch.cat(blocks))


def norm_factor(norm: nn.Module, stream: torch.Tensor) -> torch.Tensor:
    """float32 ``s`` with ``norm(x) = x * s`` for an RMS norm (``w * x / rms(x)``, w its weight or 1 + weight, or
    none), ``[..., D]`` like ``stream``: a norm after a sum of sources is their sum's per-position scaling, so each
    source's share of the normed output is its own output times ``s``. Other norms: a CircuitsError."""
    for formula in _formulas(norm, stream.shape[-1]) or ("rms",):
        if formula != "layer" and _reproduces_forward(norm, formula, stream):
            rstd = torch.rsqrt(stream.float().pow(2).mean(-1, keepdim=True) + (_epsilon(norm) or 0.0))
            weight = _weight(norm, formula)
            return rstd if weight is None else weight * rstd
    raise CircuitsError(
        f"{type(norm).__name__} after a sum of sources is not an RMS norm (w * x / rms(x)): the sources' shares of "
        "its output are not defined; this model is not supported"
    )


def _stacked(blocks: Sequence[torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
    """The blocks stacked along their first dimension in one new float32 tensor, each times ``weight``."""
    first = blocks[0]
    out = torch.empty((sum(len(block) for block in blocks), *first.shape[1:]), dtype=torch.float32, device=first.device)
    row = 0
    for block in blocks:
        rows = out[row : row + len(block)]
        torch.mul(block, weight, out=rows) if weight is not None else rows.copy_(block)
        row += len(block)
    return out


def _formulas(norm: nn.Module, width: int) -> tuple[str, ...]:
    """The written-out forms ``norm`` may have by its parameters: "layer" (mean and variance, weight w), "rms"
    (weight w) or "rms+1" (weight 1 + w, Gemma's), each verified before use; none when it has other parameters."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        return ()
    if isinstance(norm, nn.LayerNorm):
        return ("layer",) if norm.normalized_shape == (width,) else ()
    if getattr(norm, "bias", None) is None and isinstance(_epsilon(norm), float):
        return ("rms", "rms+1", "layer")  # "layer": a LayerNorm without a bias (Cohere's)
    return ()


def _weight(norm: nn.Module, formula: str) -> torch.Tensor | None:
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    weight = weight.detach().float()
    return weight + 1 if formula == "rms+1" else weight


def _epsilon(norm: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return None


def _written_out(
    norm: nn.Module, formula: str, stream: torch.Tensor, output_grads: Sequence[torch.Tensor]
) -> torch.Tensor:
    """With x^ = (x - c mean x) r, r = 1 / sqrt(mean((x - c mean x)^2) + eps) and h = w g (c = 1 for LayerNorm,
    0 for RMSNorm): dx = r (h - c mean h - x^ mean(h x^))."""
    x = stream.float()
    if formula == "layer":
        x = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _epsilon(norm))
    normalized = x * rstd  # [1, B, T, D]
    grads = _stacked(output_grads, _weight(norm, formula))  # [n, B, T, D], a new tensor: updated in place below
    if formula == "layer":
        grads -= grads.mean(-1, keepdim=True)
    projection = torch.einsum("nbtd,btd->nbt", grads, normalized[0]).unsqueeze(-1) / x.shape[-1]
    grads.addcmul_(normalized, projection, value=-1)
    return grads.mul_(rstd)


def _by_autograd(norm: nn.Module, stream: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = stream.detach().requires_grad_(True)
        normed = norm(leaf)
        (grads,) = torch.autograd.grad(normed, leaf, output_grads.unsqueeze(1), is_grads_batched=True)
    return grads.squeeze(1).float()


def _reproduces_forward(norm: nn.Module, formula: str, stream: torch.Tensor) -> bool:
    """Does ``norm`` compute the RMS ``formula`` (checked once per class and formula)?"""
    key = (type(norm), formula + " forward")
    if key not in _VERIFIED:
        generator = torch.Generator().manual_seed(0)
        probe = (torch.randn((2, 3, stream.shape[-1]), generator=generator) * 3 + 1).to(stream.device, stream.dtype)
        with torch.no_grad():
            expected = norm(probe).float()
            rstd = torch.rsqrt(probe.float().pow(2).mean(-1, keepdim=True) + (_epsilon(norm) or 0.0))
            weight = _weight(norm, formula)
            got = probe.float() * (rstd if weight is None else weight * rstd)
        tolerance = 1e-4 if stream.dtype == torch.float32 else 5e-2
        _VERIFIED[key] = bool(torch.allclose(got, expected, rtol=0, atol=tolerance * float(expected.abs().max())))
    return _VERIFIED[key]


def _reproduces_autograd(norm: nn.Module, formula: str, stream: torch.Tensor) -> bool:
    """Does the written-out ``formula`` give autograd's gradients for this norm class (checked once)?"""
    key = (type(norm), formula)
    if key not in _VERIFIED:
        generator = torch.Generator().manual_seed(0)
        shape = (1, 2, 3, stream.shape[-1])
        probe = (torch.randn(shape, generator=generator) * 3 + 1).to(stream.device, stream.dtype)
        grads = torch.randn((2, *shape[1:]), generator=generator).to(stream.device, stream.dtype)
        expected = _by_autograd(norm, probe, grads)
        got = _written_out(norm, formula, probe, (grads,))
        tolerance = 1e-4 if stream.dtype == torch.float32 else 5e-2
        _VERIFIED[key] = bool(torch.allclose(got, expected, rtol=0, atol=tolerance * float(expected.abs().max())))
    return _VERIFIED[key]
