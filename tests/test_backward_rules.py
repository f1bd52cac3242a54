"""Modified backward passes (``backward="gim"`` / ``"relp"``, ``circuits.arch.rules``) as a specification.

Each rule's backward against its hand-derived formula on small tensors; the forward unchanged with the rules on;
scores against an independent oracle: the hook-based attribution of ``tests/test_gradient.py`` run through the
plain HF model whose norms, activations, gated projections, softmax and attention function are replaced by hand
(``detach`` tricks, eager attention: none of the package's rule code); ``backward="gradient"`` bit-identical to
the default; the refusals.
"""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from test_devices import on_disk_after_layer_0, split_map
from test_gradient import assert_equal_scores, oracle_scores, prefix_task
from torch import nn

import circuits
from circuits.arch.rules import RULE_SETS, backward_rules, frozen_norm_input_gradients
from circuits.cli import main
from circuits.testing import tiny_hf, tiny_pair

# RMSNorm, GQA, SwiGLU; LayerNorm, fused Conv1D q/k/v; 1 + w norms, capped scores, post-norms; parallel blocks
ARCHS = ["llama", "gpt2", "gemma2", "neox"]
TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def task():
    return prefix_task()


def tiny(arch: str) -> circuits.Model:
    return circuits.Model.from_hf(tiny_hf(arch))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits (scores hold NaN where no edge is: ``torch.equal`` would say no)."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def vjp(function, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (result,) = torch.autograd.grad(function(x), x, grad)
    return result


# --- each rule against its formula ------------------------------------------------------------------------------


def test_a_frozen_rms_norm_passes_w_g_over_rms():
    model = tiny("llama")
    norm = model.hf.model.layers[0].input_layernorm
    x, g = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    rms = (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    with backward_rules(model, "gim"):
        got = vjp(norm, x, g)
    assert torch.allclose(got, norm.weight.detach() * g / rms, atol=1e-6)
    assert not torch.allclose(vjp(norm, x, g), got, atol=1e-3)  # the exact gradient differs


def test_a_frozen_gemma_norm_weighs_by_one_plus_w():
    model = tiny("gemma2")
    norm = model.hf.model.layers[1].input_layernorm
    x, g = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    rms = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    with backward_rules(model, "relp"):
        got = vjp(norm, x, g)
    assert torch.allclose(got, (1 + norm.weight.detach()) * g / rms, atol=1e-6)


def test_a_frozen_layer_norm_keeps_the_centring_and_freezes_the_std():
    model = tiny("gpt2")
    norm = model.hf.transformer.h[0].ln_1
    x, g = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    h = norm.weight.detach() * g
    with backward_rules(model, "gim"):
        got = vjp(norm, x, g)
    assert torch.allclose(got, (h - h.mean(-1, keepdim=True)) / std, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_the_engines_written_out_norm_jacobian_is_the_frozen_one(arch):
    model = tiny(arch)
    norm = model.adapter.attention_norm(1)
    stream, grads = torch.randn(1, 2, 3, 32), torch.randn(5, 2, 3, 32)
    with backward_rules(model, "gim"):
        expected = torch.stack([vjp(norm, stream[0], g) for g in grads])
    got = frozen_norm_input_gradients(norm, stream, (grads[:2], grads[2:]))
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_temperature_softmax_keeps_its_forward_and_passes_the_jacobian_at_scores_over_t():
    scores, g = torch.randn(2, 3, 5, 5) * 3, torch.randn(2, 3, 5, 5)
    scores[..., 0, 1:] = torch.finfo(torch.float32).min  # a masked row: what attention computes
    soft = (scores / TEMPERATURE).softmax(-1)
    got = vjp(RULE_SETS["gim"].softmax, scores, g)
    assert torch.equal(RULE_SETS["gim"].softmax(scores), scores.softmax(-1))
    assert torch.allclose(got, soft * (g - (g * soft).sum(-1, keepdim=True)), atol=1e-6)
    assert torch.all(got[..., 0, 1:] == 0)
    assert not torch.allclose(got, vjp(lambda s: s.softmax(-1), scores, g), atol=1e-3)


def test_the_ratio_rule_passes_g_times_f_of_x_over_x():
    model = tiny("gpt2")
    act = model.hf.transformer.h[0].mlp.act
    x, g = torch.randn(4, 7), torch.randn(4, 7)
    x[0, 0] = 0.0  # f(0) / stabilised 0 = 0
    with backward_rules(model, "relp"):
        got = vjp(act, x, g)
        assert torch.equal(act(x), act.__class__.forward(act, x))  # the module's own forward
    stabilised = x + ((x == 0).float() + x.sign()) * 1e-6
    assert torch.allclose(got, g * act(x) / stabilised, atol=1e-6)
    assert got[0, 0] == 0


def test_the_half_rule_gives_each_operand_of_a_gated_product_half_its_gradient():
    """Llama's MLP down(silu(gate x) * up x) under RelP (half rule and ratio rule): by hand."""
    model = tiny("llama")
    mlp = model.hf.model.layers[0].mlp
    x, g = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    a, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    grad_product = (g @ mlp.down_proj.weight).detach()
    stabilised = a + ((a == 0).float() + a.sign()) * 1e-6
    by_hand = 0.5 * (grad_product * u * F.silu(a) / stabilised) @ mlp.gate_proj.weight
    by_hand = by_hand + 0.5 * (grad_product * F.silu(a)) @ mlp.up_proj.weight
    with backward_rules(model, "relp"):
        got = vjp(mlp, x, g)
    assert torch.allclose(got, by_hand.detach(), atol=1e-5)


def test_gim_halves_a_gated_mlps_gradient():
    model = tiny("gemma2")
    mlp = model.hf.model.layers[2].mlp
    x, g = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with backward_rules(model, "gim"):
        got = vjp(mlp, x, g)
    assert torch.allclose(got, 0.5 * vjp(mlp, x, g), atol=1e-6)


def attention_case(model):
    adapter = model.adapter
    b, h, t, e = 2, adapter.n_heads, 5, adapter.head_dim
    q, k, v, g = (torch.randn(b, h, t, e) for _ in range(4))
    mask = torch.ones(b, t, dtype=torch.long)
    ctx = adapter.context(mask, torch.zeros(b, t, adapter.d_model), torch.arange(t).expand(b, t))
    return q, k, v, g, ctx


def test_gim_scales_the_query_key_and_value_gradients_around_the_tempered_softmax():
    model = tiny("gpt2")  # one key/value head per query head
    adapter, scale = model.adapter, model.adapter.scale(0)
    q, k, v, g, ctx = attention_case(model)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~ctx.attention_mask, torch.finfo(torch.float32).min)
    weights, soft = scores.softmax(-1), (scores / TEMPERATURE).softmax(-1)
    grad_weights = g @ v.transpose(-1, -2)
    grad_scores = soft * (grad_weights - (grad_weights * soft).sum(-1, keepdim=True))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with backward_rules(model, "gim"):
        z = adapter.attend(0, *leaves, ctx)
    assert torch.allclose(z, weights @ v, atol=1e-5)
    got = torch.autograd.grad(z, leaves, g)
    assert torch.allclose(got[0], 0.25 * scale * grad_scores @ k, atol=1e-5)
    assert torch.allclose(got[1], 0.25 * scale * grad_scores.transpose(-1, -2) @ q, atol=1e-5)
    assert torch.allclose(got[2], 0.5 * weights.transpose(-1, -2) @ g, atol=1e-5)


def test_relp_treats_the_attention_weights_as_constants():
    model = tiny("gpt2")
    q, k, v, g, ctx = attention_case(model)
    scores = (q @ k.transpose(-1, -2) * model.adapter.scale(0)).masked_fill(~ctx.attention_mask, -1e30)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with backward_rules(model, "relp"):
        z = model.adapter.attend(0, *leaves, ctx)
    grads = torch.autograd.grad(z, leaves, g, allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert torch.allclose(grads[2], scores.softmax(-1).transpose(-1, -2) @ g, atol=1e-5)


# --- the forward is the model's own -----------------------------------------------------------------------------


@pytest.mark.parametrize("backward", ["gim", "relp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_rules_leave_the_forward_unchanged(arch, backward):
    model = tiny(arch)
    clean, _, mask = tiny_pair()
    with torch.no_grad():
        engine = circuits.patched_forward(model, clean, mask).logits
        hf = model.hf(clean, attention_mask=mask).logits
        with backward_rules(model, backward):
            ruled = circuits.patched_forward(model, clean, mask).logits
            hf_ruled = model.hf(clean, attention_mask=mask).logits
    assert torch.equal(hf_ruled, hf)  # the wrapped modules compute their own forward
    assert torch.allclose(ruled, engine, rtol=0, atol=1e-5 * float(engine.abs().max()))  # written-out attention


# --- scores against the hand-made oracle ------------------------------------------------------------------------


def _gradient_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * scale + (x * (1 - scale)).detach()


@contextlib.contextmanager
def hand_rules(hf: nn.Module, backward: str):
    """The rule set by hand on the plain HF model (eager attention): frozen norms by ``detach``, the ratio rule as
    RelP's code writes it, half gradients at the gate and up projections, the softmax and the attention function
    of transformers patched."""
    hf.set_attn_implementation("eager")
    patched, hooks = [], []

    def patch(owner, name, value):
        patched.append((owner, name, owner.__dict__.get(name), name in owner.__dict__))
        setattr(owner, name, value)

    for module in hf.modules():
        name = type(module).__name__
        if isinstance(module, nn.LayerNorm):

            def layer_norm(x, m=module):
                centred = x - x.mean(-1, keepdim=True)
                std = (centred.pow(2).mean(-1, keepdim=True) + m.eps).sqrt()
                return centred / std.detach() * m.weight + m.bias

            patch(module, "forward", layer_norm)
        elif name.endswith("RMSNorm"):
            gemma = name.startswith("Gemma")

            def rms_norm(x, m=module, gemma=gemma):
                eps = getattr(m, "eps", None) or m.variance_epsilon
                rms = (x.float().pow(2).mean(-1, keepdim=True) + eps).sqrt()
                weight = 1 + m.weight.float() if gemma else m.weight.float()
                return (weight * (x.float() / rms.detach())).to(x.dtype)

            patch(module, "forward", rms_norm)
        elif backward == "relp" and type(module).__module__ == "transformers.activations":

            def ratio(x, f=module.forward):
                stabilised = x + ((x == 0).to(x.dtype) + x.sign()) * 1e-6
                return stabilised * (f(x) / stabilised).detach()

            patch(module, "forward", ratio)
        if hasattr(module, "gate_proj"):
            for projection in (module.gate_proj, module.up_proj):
                hooks.append(projection.register_forward_hook(lambda m, a, out: _gradient_scale(out, 0.5)))
    softmax = F.softmax

    def ruled_softmax(x, dim=None, _stacklevel=3, dtype=None):
        weights = softmax(x, dim=dim, dtype=dtype)
        if backward == "relp":
            return weights.detach() + 0 * weights  # no gradient, and q/k stay in the graph (a zero gradient)
        soft = TEMPERATURE * softmax((x if dtype is None else x.to(dtype)) / TEMPERATURE, dim=dim)
        return weights.detach() + (soft - soft.detach())

    patch(F, "softmax", ruled_softmax)
    if backward == "gim":
        modeling = sys.modules[type(hf).__module__]
        attention = modeling.eager_attention_forward

        def scaled_attention(module, q, k, v, *args, **kwargs):
            q, k, v = _gradient_scale(q, 0.25), _gradient_scale(k, 0.25), _gradient_scale(v, 0.5)
            return attention(module, q, k, v, *args, **kwargs)

        patch(modeling, "eager_attention_forward", scaled_attention)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for owner, name, value, had in reversed(patched):
            if had:
                setattr(owner, name, value)
            else:
                delattr(owner, name)


def hand_oracle_scores(arch: str, task, method: str, backward: str) -> torch.Tensor:
    oracle_model = tiny(arch)  # the same weights, its own modules to patch
    with hand_rules(oracle_model.hf, backward):
        return oracle_scores(oracle_model, task, method, "patching")


@pytest.mark.parametrize("backward", ["gim", "relp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_eap_with_rules_equals_the_hand_made_oracle(arch, backward, task):
    scores = circuits.attribute(tiny(arch), task, "eap", batch_size=4, progress=False, backward=backward)
    expected = hand_oracle_scores(arch, task, "eap", backward)
    assert_equal_scores(scores.tensor, expected, tolerance=1e-5)
    plain = circuits.attribute(tiny(arch), task, "eap", batch_size=4, progress=False).tensor
    real = ~torch.isnan(expected)
    assert (plain[real] - scores.tensor[real]).abs().max() > 0.05 * plain[real].abs().max()  # the rules matter


@pytest.mark.parametrize("backward", ["gim", "relp"])
def test_eap_ig_inputs_with_rules_equals_the_hand_made_oracle(backward, task):
    scores = circuits.attribute(
        tiny("gemma2"), task, "eap-ig-inputs", batch_size=4, ig_steps=3, progress=False, backward=backward
    )
    assert_equal_scores(scores.tensor, hand_oracle_scores("gemma2", task, "eap-ig-inputs", backward), 1e-5)


def test_relp_scores_every_query_and_key_edge_zero(task):
    model = tiny("llama")
    scores = circuits.attribute(model, task, "eap", batch_size=4, progress=False, backward="relp").tensor
    graph = model.graph
    kinds = [name.rsplit("<", 1)[-1].rstrip(">") if name.endswith(">") else "" for name in graph.destinations]
    qk = torch.tensor([kind in ("q", "k") for kind in kinds])
    values = torch.tensor([kind == "v" for kind in kinds])
    assert torch.all(scores[:, qk][graph.real[:, qk]] == 0)
    assert scores[:, values][graph.real[:, values]].abs().max() > 0


# --- the plain gradient, the API, the refusals ------------------------------------------------------------------


def test_backward_gradient_is_bit_identical_to_the_default(task):
    model = tiny("qwen3")
    default = circuits.attribute(model, task, "eap-ig-inputs", batch_size=4, ig_steps=2, progress=False)
    explicit = circuits.attribute(
        model, task, "eap-ig-inputs", batch_size=4, ig_steps=2, progress=False, backward="gradient"
    )
    assert bitwise_equal(default.tensor, explicit.tensor)
    assert "backward" not in explicit.meta


def test_a_plain_checkpoint_serves_backward_gradient_and_is_refused_to_gim(task, tmp_path):
    model, path = tiny("llama"), tmp_path / "eap.ckpt"
    plain = circuits.attribute(model, task, "eap", batch_size=4, progress=False, checkpoint=path)
    again = circuits.attribute(model, task, "eap", batch_size=4, progress=False, checkpoint=path, backward="gradient")
    assert bitwise_equal(plain.tensor, again.tensor)
    with pytest.raises(circuits.CircuitsError, match="belongs to another run: backward differs"):
        circuits.attribute(model, task, "eap", batch_size=4, progress=False, checkpoint=path, backward="gim")


def test_the_scores_record_their_backward(task):
    scores = circuits.attribute(tiny("llama"), task, "eap", batch_size=4, progress=False, backward="gim")
    assert scores.meta["backward"] == "gim"


def test_exact_patching_refuses_a_modified_backward(task):
    with pytest.raises(circuits.CircuitsError, match="backward 'gim' modifies gradients, and method 'exact'"):
        circuits.attribute(tiny("llama"), task, "exact", backward="gim")


def test_an_unknown_backward_is_refused_naming_the_choices(task):
    with pytest.raises(circuits.CircuitsError, match="unknown backward 'lrp'; choose one of gradient, gim, relp"):
        circuits.attribute(tiny("llama"), task, "eap", backward="lrp")


def test_relp_refuses_a_model_whose_activation_is_no_module(task):
    with pytest.raises(circuits.CircuitsError, match="layer 0 of 'gpt_oss' computes its activation without a module"):
        circuits.attribute(tiny("gpt_oss"), task, "eap", backward="relp", progress=False)


class DoublingRMSNorm(nn.Module):
    """Named like a norm, computes something else."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(32))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return 2 * x * self.weight


def test_a_norm_the_rules_cannot_freeze_is_refused_naming_its_class(task):
    model = tiny("llama")
    model.hf.model.layers[1].post_attention_layernorm = DoublingRMSNorm()
    with pytest.raises(circuits.CircuitsError, match="DoublingRMSNorm is not a LayerNorm or RMSNorm"):
        circuits.attribute(model, task, "eap", backward="gim", progress=False)


def installed(model: circuits.Model) -> list[str]:
    """What a rule set could have left behind: instance forwards, forward pre-hooks, the adapter's rules."""
    left = [name for name, module in model.hf.named_modules() if "forward" in module.__dict__]
    left += [name for name, module in model.hf.named_modules() if module._forward_pre_hooks]
    return left + (["adapter"] if model.adapter.backward_rules is not None else [])


def test_the_rules_are_removed_on_exit_and_on_an_error():
    model = tiny("qwen3")
    with backward_rules(model, "relp"):
        assert installed(model)
    assert installed(model) == []
    with pytest.raises(RuntimeError, match="boom"), backward_rules(model, "gim"):
        raise RuntimeError("boom")
    assert installed(model) == []


def test_rule_sets_do_not_nest():
    model = tiny("llama")
    with backward_rules(model, "gim"), pytest.raises(circuits.CircuitsError, match="do not nest"):
        with backward_rules(model, "relp"):
            pass
    assert installed(model) == []


@pytest.mark.parametrize(
    "arch",
    ["gpt_neo", pytest.param("mixtral", marks=pytest.mark.slow), "falcon_sequential_alibi", "cohere_qk_norm", "olmo"],
)
def test_every_family_runs_under_both_rule_sets(arch, task):
    """Local attention, experts, ALiBi, per-head q/k norms, weightless norms: finite scores that differ from the
    gradient's."""
    model = tiny(arch)
    plain = circuits.attribute(model, task, "eap", batch_size=6, progress=False).tensor
    real = model.graph.real
    for backward in ("gim", "relp"):
        scores = circuits.attribute(model, task, "eap", batch_size=6, progress=False, backward=backward).tensor
        assert torch.isfinite(scores[real]).all()
        assert (scores[real] - plain[real]).abs().max() > 0.05 * plain[real].abs().max()


def test_a_model_with_offloaded_layers_scores_as_the_model_in_memory(tmp_path, task):
    """Layers 1.. on disk (their norms' weights on the meta device when the rules are installed)."""
    hf = tiny_hf("gemma2")
    hf.save_pretrained(tmp_path / "model")
    in_memory = circuits.Model.from_hf(hf)
    offloaded = circuits.load_model(
        str(tmp_path / "model"),
        device_map=split_map(in_memory, on_disk_after_layer_0),
        offload_folder=tmp_path / "offload",
        dtype=torch.float32,
    )
    for backward in ("gim", "relp"):
        expected = circuits.attribute(in_memory, task, "eap", batch_size=4, progress=False, backward=backward)
        scores = circuits.attribute(offloaded, task, "eap", batch_size=4, progress=False, backward=backward)
        torch.testing.assert_close(scores.tensor, expected.tensor, rtol=0, atol=1e-6, equal_nan=True)


# --- the command ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_discover_takes_a_backward_and_records_it(tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "run"
    tiny_hf("llama").save_pretrained(model_dir)
    status = main(
        ["discover", "--model", str(model_dir), "--task", "induction", "--n", "6", "--method", "eap",
         "--backward", "relp", "--top-n", "10", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert status == 0
    assert json.loads((out / "summary.json").read_text())["backward"] == "relp"


def test_discover_refuses_exact_with_a_modified_backward_before_loading_the_model(tmp_path, capsys):
    status = main(
        ["discover", "--model", str(tmp_path / "no-such-model"), "--task", "induction", "--method", "exact",
         "--backward", "gim", "--out", str(tmp_path / "run"), "--quiet"]
    )  # fmt: skip
    assert status == 2
    assert "backward 'gim' modifies gradients, and method 'exact'" in capsys.readouterr().err
