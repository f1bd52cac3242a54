"""Modified backward passes: GIM and RelP as one mechanism, for every architecture.

A gradient method (EAP, EAP-IG, ...) contracts deltas with ``d metric / d in_v``. A *backward rule set* keeps
every forward value exactly as it is and replaces the backward of a few nonlinear operations by a rule:

- **norm, frozen statistics** (GIM's LayerNorm freeze; RelP's LN-rule): a LayerNorm ``w (x - mean x) r + b`` or
  RMSNorm ``w x r`` (``r = 1 / sqrt(var + eps)``, ``w`` its weight, ``1 + w`` for Gemma's) passes gradients as if
  ``r`` were a constant: ``dx = r (h - mean h)`` (LayerNorm; the centring is linear and stays) or ``dx = r h``
  (RMSNorm), ``h = w g``;
- **softmax at a temperature** (GIM's temperature-scaled gradients, T = 2): the attention softmax ``p =
  softmax(s)`` passes ``ds = p_T (g - sum(g p_T))`` with ``p_T = softmax(s / T)``: the softmax Jacobian at the
  softened scores, without the chain rule's ``1 / T``;
- **constant attention weights** (RelP's AH-rule): ``p`` passes no gradient, so queries and keys get none;
- **q/k/v scaling** (GIM): the gradients at the queries, keys and values times 1/4, 1/4 and 1/2;
- **activation ratio** (RelP's Identity-rule): an MLP activation ``z = f(x)`` passes ``dx = g z / x`` (``x``
  moved 1e-6 away from zero, as RelP's code stabilises it);
- **half rule** (RelP's Half-rule; GIM's gate/up scaling): a gated product ``a * u`` (``f(gate) * up``) passes
  half the gradient to each operand. Every path from a gated MLP's input (an MoE's experts' input) to its output
  crosses one such product and the rule is linear, so it is applied as half the gradient at that input.

``backward_rules(model, name)`` installs a rule set while a gradient method runs: the HF norm and activation
modules' forwards are wrapped (instance attributes, removed on exit) in ``torch.autograd.Function``s whose
forward calls the module's own forward and whose backward is the rule; gated MLPs get a forward pre-hook; the
adapter's attention (``Adapter.attend``) takes the written-out path with the rule's softmax and q/k/v scaling,
and a norm after a sum of heads (Gemma 2/3, OLMo 2) freezes its factor there too. The engine's written-out
norm Jacobian (``circuits.engine._SharedQKV``) takes the frozen one (``frozen_norm_input_gradients``).
``backward="gradient"`` installs nothing.

Sources: GIM (Edin et al. 2025, arXiv 2505.17630) as the authors' code defines it (JoakimEdin/gim
``src/gim``: ``layernorm.py`` "freeze" divides by the norm's scale; ``utils.softmax_tsg`` the softmax derivative
at ``softmax(scores / T)``, ``config.tsg_temperature = 2.0``; ``attention._grad_normalize`` query / 4, key / 4,
value / 2; ``mlp.py`` a gated MLP's gradient / 2; ``evaluation/evaluate_layers.py`` the "gim" configuration:
all four on, activations' plain gradient) and its package (corticph/gim ``src/gim/context``: the same constants,
``softmax_temperature=2``, ``q_scale=k_scale=0.25``, ``v_scale=0.5``, ``gate_scale=up_scale=0.5``, the mean of a
LayerNorm kept in the graph and its std detached). RelP (Jafari et al. 2025, arXiv 2508.21258; its README's table
of rules, and the code in FarnoushRJ/RelP ``TransformerLens/transformer_lens``: ``components/layer_norm.py`` and
``rms_norm.py`` divide by ``scale.detach()``, ``utilities/activation_functions.ModifiedAct`` and
``lrp_utils.stabilize`` the ratio rule, ``components/mlps/gated_mlp.py`` ``out / 2 + (out / 2).detach()``,
``components/abstract_attention.py`` ``pattern.detach()`` for the AH-rule).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..choices import BACKWARDS, check_choice
from ..errors import CircuitsError
from .norms import _epsilon, _stacked

if TYPE_CHECKING:
    from ..model import Model


@dataclass(frozen=True)
class RuleSet:
    """Which backward rules a named set applies (see the module docstring)."""

    name: str
    freeze_norms: bool = False
    softmax_temperature: float | None = None  # the softmax's backward at scores / T (None: the exact one)
    constant_attention: bool = False  # the attention weights pass no gradient (RelP's AH-rule)
    qkv_scales: tuple[float, float, float] | None = None  # gradients at q, k, v times these (GIM)
    activation_ratio: bool = False  # MLP activations pass g * f(x) / x (RelP's Identity-rule)
    gate_scale: float | None = None  # each operand of a gated product gets this share of the gradient

    def attention_inputs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values as they are, their gradients scaled (GIM)."""
        if self.qkv_scales is None:
            return q, k, v
        return tuple(_ScaleGradient.apply(x, s) for x, s in zip((q, k, v), self.qkv_scales, strict=True))

    def softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores.softmax(-1)``, its backward by the rule."""
        if self.constant_attention:
            return scores.softmax(-1).detach()
        if self.softmax_temperature is not None:
            return _TemperatureSoftmax.apply(scores, self.softmax_temperature)
        return scores.softmax(-1)

    def norm_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """A norm's per-position factor ``s`` of ``norm(x) = x s`` (``circuits.arch.norms.norm_factor``): a
        constant under frozen statistics."""
        return factor.detach() if self.freeze_norms else factor


RULE_SETS: dict[str, RuleSet] = {
    # GIM: frozen norms, softmax backward at T = 2, q/k/v gradients / 4, / 4, / 2, gated MLPs' gradient / 2
    "gim": RuleSet("gim", freeze_norms=True, softmax_temperature=2.0, qkv_scales=(0.25, 0.25, 0.5), gate_scale=0.5),
    # RelP: LN-rule, AH-rule, Identity-rule, Half-rule (linear layers: the 0-rule, i.e. the gradient)
    "relp": RuleSet("relp", freeze_norms=True, constant_attention=True, activation_ratio=True, gate_scale=0.5),
}


# --- the rules' autograd functions: forward = the original computation, backward = the rule ---------------------


class _ScaleGradient(torch.autograd.Function):
    """``x`` unchanged; its gradient times ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _TemperatureSoftmax(torch.autograd.Function):
    """``scores.softmax(-1)``; backward ``p_T (g - sum(g p_T))`` with ``p_T = softmax(scores / T)``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return scores.softmax(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scores,) = ctx.saved_tensors
        soft = (scores / ctx.temperature).softmax(-1)
        return soft * (grad - (grad * soft).sum(-1, keepdim=True)), None


class _FrozenNorm(torch.autograd.Function):
    """The norm module's own output; backward with its statistics held constant (``_NormSpec.input_gradient``).
    ``spec`` holds the norm's formula, or nothing yet (weights offloaded when the rules were installed): then it
    is found here, where they are loaded. The raw weight is saved as autograd saves weights (an offloaded one as
    the way to reload it, ``circuits.placement``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Callable, norm: nn.Module, spec: list) -> torch.Tensor:
        if not spec:
            spec.append(norm_spec(norm, run, deferred=False))
        ctx.spec = spec[0]
        ctx.save_for_backward(x, _raw_weight(norm))
        return run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return ctx.spec.input_gradient(x, grad, weight).to(x.dtype), None, None, None


class _RatioActivation(torch.autograd.Function):
    """The activation module's own output ``z = f(x)``; backward ``g z / x``, ``x`` stabilised away from zero."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = run(x)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, out = ctx.saved_tensors
        dtype = _compute_dtype(x)
        return (grad.to(dtype) * out.to(dtype) / stabilized(x.to(dtype))).to(x.dtype), None


def stabilized(x: torch.Tensor) -> torch.Tensor:
    """``x`` moved ``STABILIZER`` away from zero (zero itself to +STABILIZER): RelP's ``stabilize``."""
    return x + ((x == 0).to(x.dtype) + x.sign()) * STABILIZER


STABILIZER = 1e-6


# --- norms: which formula a module computes -------------------------------------------------------------------


@dataclass(frozen=True)
class _NormSpec:
    """A norm ``w (x - c mean x) r (+ b)``, ``r = 1 / sqrt(mean((x - c mean x)^2) + eps)`` over the last ``dims``
    axes, weighed by its weight (``form`` "w"), one plus it ("1+w", Gemma's) or nothing ("none")."""

    centered: bool
    form: str
    eps: float
    dims: int

    def _axes(self) -> tuple[int, ...]:
        return tuple(range(-self.dims, 0))

    def weight(self, raw: torch.Tensor | None) -> torch.Tensor | None:
        """The effective weight (w or 1 + w) in float32 at least, from the module's raw weight."""
        if raw is None or self.form == "none":
            return None
        raw = raw.detach().to(_compute_dtype(raw))
        return raw + 1 if self.form == "1+w" else raw

    def rstd(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_compute_dtype(x))
        if self.centered:
            x = x - x.mean(self._axes(), keepdim=True)
        return torch.rsqrt(x.pow(2).mean(self._axes(), keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor, raw: torch.Tensor | None) -> torch.Tensor:
        """The formula's output (bias left out), to check a module against."""
        x = x.to(_compute_dtype(x))
        if self.centered:
            x = x - x.mean(self._axes(), keepdim=True)
        out = x * self.rstd(x)
        weight = self.weight(raw)
        return out if weight is None else out * weight

    def input_gradient(self, x: torch.Tensor, grad: torch.Tensor, raw: torch.Tensor | None) -> torch.Tensor:
        """``r (h - c mean h)``, ``h = w g`` (float32 at least): the gradient at ``x`` with ``r`` a constant."""
        weight = self.weight(raw)
        h = grad.to(_compute_dtype(grad)) if weight is None else grad.to(_compute_dtype(grad)) * weight
        if self.centered:
            h = h - h.mean(self._axes(), keepdim=True)
        return h * self.rstd(x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _raw_weight(norm: nn.Module) -> torch.Tensor | None:
    weight = getattr(norm, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


_NORM_NAME = re.compile(r"(RMS|Layer)Norm")
_VERIFIED: dict[tuple[type, bool, str, int], bool] = {}  # (class, centered, weight form, dims) -> forward matches


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm module that computes the norm itself (no child modules)."""
    if next(module.children(), None) is not None:
        return False
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or bool(_NORM_NAME.search(type(module).__name__))


def norm_spec(norm: nn.Module, run: Callable | None = None, deferred: bool = True) -> _NormSpec | None:
    """The formula ``norm`` computes (a LayerNorm or an RMSNorm, weighed by w or 1 + w or not at all), checked
    against its forward (``run``, default its class's) on a probe, once per class and form; a CircuitsError
    naming its class otherwise. With its weights offloaded (on the meta device) and no check of its class made
    yet, None when ``deferred`` (the check waits until they are loaded)."""
    weight = _raw_weight(norm)
    if isinstance(norm, nn.LayerNorm | nn.RMSNorm):
        dims = len(norm.normalized_shape)
        shape = tuple(norm.normalized_shape)
        eps = norm.eps if norm.eps is not None else torch.finfo(_dtype(norm)).eps
        centerings = (isinstance(norm, nn.LayerNorm),)
    else:  # transformers' own norms: statistics over the last axis, a weight of any trailing shape
        dims = 1
        shape = tuple(weight.shape) if weight is not None else tuple(getattr(norm, "normalized_shape", ()) or ())
        eps = _epsilon(norm)
        eps = 1e-5 if eps is None else eps  # e.g. OLMo's weightless LayerNorm (F.layer_norm's default)
        centerings = (False, True)
    candidates = [
        _NormSpec(centered, form, eps, dims)
        for centered in centerings
        for form in (("none",) if weight is None else ("w", "1+w"))
    ]
    offloaded = any(parameter.device.type == "meta" for parameter in norm.parameters())
    for spec in candidates:
        key = (type(norm), spec.centered, spec.form, spec.dims)
        if offloaded and _VERIFIED.get(key):
            return spec
    if offloaded and deferred:
        return None
    if shape and not offloaded:
        run = run or functools.partial(type(norm).forward, norm)
        for spec in candidates:
            if _reproduces(norm, run, spec, shape):
                return spec
    raise CircuitsError(
        f"{type(norm).__name__} is not a LayerNorm or RMSNorm this package can write out (w (x - mean) / std or "
        "w x / rms): its statistics cannot be frozen for a modified backward (backward='gim' or 'relp'); use "
        "backward='gradient'"
    )


def _dtype(module: nn.Module) -> torch.dtype:
    parameter = next(module.parameters(), None)
    return torch.float32 if parameter is None else parameter.dtype


def _reproduces(norm: nn.Module, run: Callable, spec: _NormSpec, shape: tuple[int, ...]) -> bool:
    key = (type(norm), spec.centered, spec.form, spec.dims)
    if key not in _VERIFIED:
        parameter = next(norm.parameters(), None)
        device, dtype = (parameter.device, parameter.dtype) if parameter is not None else ("cpu", torch.float32)
        generator = torch.Generator().manual_seed(0)
        probe = (torch.randn((2, 3, *shape), generator=generator) * 3 + 1).to(device, dtype)
        with torch.no_grad():
            expected = run(probe).float()
            bias = getattr(norm, "bias", None)
            got = spec.forward(probe, _raw_weight(norm)).float()
            if isinstance(bias, torch.Tensor):
                got = got + bias.detach().float()
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        scale = float(expected.abs().max())
        _VERIFIED[key] = got.shape == expected.shape and bool(
            torch.allclose(got, expected, rtol=0, atol=tolerance * scale)
        )
    return _VERIFIED[key]


def frozen_norm_input_gradients(
    norm: nn.Module, stream: torch.Tensor, output_grads: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """``circuits.arch.norms.norm_input_gradients`` with the norm's statistics frozen: ``[n, B, T, D]`` float32
    gradients at ``stream`` (``[1, B, T, D]``) for n gradients at the norm's output (one tensor, or blocks).
    The norm's weights are where it runs (the engine calls this inside the layer's placement stage)."""
    blocks = (output_grads,) if isinstance(output_grads, torch.Tensor) else tuple(output_grads)
    if isinstance(norm, nn.Identity):
        return _stacked(blocks)
    spec = norm_spec(norm, deferred=False)
    weight = spec.weight(_raw_weight(norm))
    grads = _stacked(blocks, None if weight is None else weight.float().to(stream.device))  # new: updated in place
    if spec.centered:
        grads -= grads.mean(-1, keepdim=True)
    return grads.mul_(spec.rstd(stream).float())


# --- activations and gated MLPs ----------------------------------------------------------------------------------

_ACTIVATION_MODULES = ("transformers.activations", "torch.nn.modules.activation")
_ACTIVATION_NAME = re.compile(r"(?i)(gelu|silu|swish|relu|activation)$")


def is_activation(module: nn.Module) -> bool:
    """An elementwise activation module: a parameterless leaf of transformers' or torch's activations (or named
    like one: BLOOM's ``BloomGelu``), softmax-like modules excluded."""
    cls = type(module)
    if next(module.children(), None) is not None or next(module.parameters(recurse=False), None) is not None:
        return False
    if "softmax" in cls.__name__.lower() or "softmin" in cls.__name__.lower():
        return False
    return cls.__module__ in _ACTIVATION_MODULES or bool(_ACTIVATION_NAME.search(cls.__name__))


def is_gated(module: nn.Module) -> bool:
    """A gated MLP ``down(f(gate x) * up x)`` (``gate_proj`` and ``up_proj``, or one fused ``gate_up_proj``: a
    Linear, or the experts' 3-D weight of a mixture of experts)."""
    names = {name for name, _ in module.named_children()} | {name for name, _ in module.named_parameters(recurse=False)}
    return {"gate_proj", "up_proj"} <= names or "gate_up_proj" in names


# --- installing a rule set ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def backward_rules(model: Model, backward: str) -> Iterator[RuleSet | None]:
    """While the block runs, ``model``'s backward follows the rule set ``backward`` (``"gim"`` or ``"relp"``);
    ``"gradient"`` changes nothing. Forward values stay those of the model (the attention takes the written-out
    path: equal up to float rounding). Everything installed is removed on exit, also on an error."""
    check_choice("backward", backward, BACKWARDS)
    if backward == "gradient":
        yield None
        return
    rules = RULE_SETS[backward]
    adapter = model.adapter
    if adapter.backward_rules is not None:
        raise CircuitsError(
            f"backward rules {adapter.backward_rules.name!r} are already installed on this model; they do not nest"
        )
    root = adapter.hf
    norms = [module for module in root.modules() if is_norm(module)] if rules.freeze_norms else []
    specs = [norm_spec(norm) for norm in norms]  # every norm checked before anything changes (if loaded)
    activations = [module for module in root.modules() if is_activation(module)] if rules.activation_ratio else []
    if rules.activation_ratio:
        _check_activations(model, activations)
    gated = [module for module in root.modules() if is_gated(module)] if rules.gate_scale is not None else []
    wrapped: list[tuple[nn.Module, object]] = []
    hooks = []
    try:
        adapter.backward_rules = rules
        for norm, spec in zip(norms, specs, strict=True):
            holder = [] if spec is None else [spec]  # found at the first forward when offloaded now
            wrapped.append(_wrap(norm, lambda run, x, n=norm, h=holder: _FrozenNorm.apply(x, run, n, h)))
        for activation in activations:
            wrapped.append(_wrap(activation, lambda run, x: _RatioActivation.apply(x, run)))
        for module in gated:
            hooks.append(module.register_forward_pre_hook(_gate_hook(rules.gate_scale, module), with_kwargs=True))
        yield rules
    finally:
        for hook in hooks:
            hook.remove()
        for module, previous in reversed(wrapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        adapter.__dict__.pop("backward_rules", None)


def _wrap(module: nn.Module, rule: Callable) -> tuple[nn.Module, object]:
    """Replace ``module.forward`` by ``rule(run, x)``, ``run`` the forward it had; returns what to restore."""
    previous = module.__dict__.get("forward")  # an instance attribute already there (another wrapper), or None
    original = module.forward

    def forward(x, *args, **kwargs):
        return rule(lambda t: original(t, *args, **kwargs), x)

    module.forward = forward
    return module, previous


def _gate_hook(scale: float, module: nn.Module) -> Callable:
    def hook(_, args, kwargs):
        if args:
            return (_ScaleGradient.apply(args[0], scale), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": _ScaleGradient.apply(kwargs["hidden_states"], scale)}
        raise CircuitsError(f"{type(module).__name__} was called without its input as hidden_states")

    return hook


def _check_activations(model: Model, activations: list[nn.Module]) -> None:
    """Every MLP computes its activation in a module the ratio rule can wrap (or is ReLU, where the rule is the
    gradient): else a CircuitsError naming the layer, before anything runs."""
    adapter = model.adapter
    if adapter.config.model_type == "circuits-native":  # their MLPs are ReLU (F.relu): ratio = gradient
        return
    found = {id(module) for module in activations}
    for layer in range(adapter.n_layers):
        block = adapter.layer_module(layer)
        if not any(id(module) in found for module in block.modules()):
            raise CircuitsError(
                f"backward 'relp' passes MLP activations by the ratio rule (f(x) / x), but layer {layer} of "
                f"{adapter.config.model_type!r} computes its activation without a module "
                f"({type(block).__name__}): not supported; use backward='gim' or 'gradient'"
            )


__all__ = ["RULE_SETS", "RuleSet", "backward_rules", "frozen_norm_input_gradients", "norm_spec"]
