"""The neuron levels: a source's output dimensions (``level="neuron"``) and the MLPs' hidden units
(``level="mlp-neuron"``), from attribution through selection and evaluation to export.

Gradient scores are checked against hook oracles on the plain HF model (``tests/oracle.py``, and
``test_gradient.oracle_point``'s per-destination gradients), exact scores against the oracle's patched runs, and
the two against each other to first order with the ablation values shrunk towards the clean ones (float64).
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from functools import cache

import pytest
import torch
from oracle import Oracle
from test_gradient import assert_equal_scores, oracle_point, prefix_task

import circuits
from circuits import Circuit
from circuits.engine import mlp_hidden_values, mlp_width, patched_forward, patching_values, source_outputs
from circuits.errors import CircuitsError
from circuits.methods import exact, gradient
from circuits.methods.common import Resolution, batches
from circuits.task import metric_values
from circuits.testing import tiny_hf, tiny_native, tiny_task

ARCHS = ["llama", "gpt2", "neox", "gemma2", "opt"]  # neox: parallel blocks; gemma2: norms around attention and MLP
NATIVE = "native-mlp-ln"
GRADIENT_METHODS = ["eap", "eap-ig-inputs", "eap-ig-mask", "clean-corrupted"]
STEPS = 2
# the corruption shrunk towards the clean run by these factors (the metric is taken in float32 even for a float64
# model, so an exact effect carries rounding of ~1e-7: eps much below 1e-2 would measure that, not the model)
EPSILONS = (1e-1, 1e-2)


@cache
def model_of(name: str, double: bool = False) -> circuits.Model:
    hf = tiny_native(name) if name.startswith("native") else tiny_hf(name)
    return circuits.Model.from_hf(hf.double() if double else hf, name=name)


@pytest.fixture(scope="module")
def task():
    """Pairs sharing their first two tokens (the gradient path trims them), of different lengths."""
    return prefix_task(prefix=2, batch=4, seq=7)


def attribute(model, task, method="eap", level="neuron", **kwargs):
    kwargs = {"batch_size": len(task), "ig_steps": STEPS, "progress": False} | kwargs
    return circuits.attribute(model, task, method, level=level, **kwargs)


def task_metric(task, logits) -> float:
    """The task-mean metric from HF or engine logits (``[B, T, V]``: read at each prompt's prediction position)."""
    tokens = task.tokenize()
    if logits.dim() == 3:
        logits = logits[torch.arange(len(tokens)), tokens.positions]
    return float(metric_values(task.metric, logits, tokens).double().mean())


@contextmanager
def forwards_counted():
    """Every module forward run while inside (any model)."""
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: calls.append(type(m).__name__))
    try:
        yield calls
    finally:
        handle.remove()


# --- 1. a source's neuron scores sum to its node score -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "arch"),
    [(method, arch) for method in GRADIENT_METHODS for arch in ("llama", "neox", NATIVE)]
    + [("eap", arch) for arch in ("gpt2", "gemma2", "opt")],
)
def test_neuron_scores_of_a_source_sum_to_its_node_score(method, arch, task):
    model = model_of(arch)
    neurons = attribute(model, task, method, "neuron")
    nodes = attribute(model, task, method, "node")
    assert neurons.tensor.shape == (model.graph.n_src, model.adapter.d_model)
    assert_equal_scores(neurons.tensor.sum(1), nodes.tensor, tolerance=1e-5)
    assert nodes.tensor.abs().max() > 1e-2


@pytest.mark.parametrize(
    ("arch", "batch_size"),
    [
        ("llama", 2),
        ("gpt2", 2),  # its runs are contracted as they come (_GroupSums does not sum): one backward each
        ("llama", 1),
    ],
)
def test_eap_ig_activations_neuron_scores_of_a_source_sum_to_its_node_score(arch, batch_size):
    """(Two examples: one layer group's run takes (2 L + 1) x steps forward/backwards.)"""
    model, task = model_of(arch), tiny_task(batch=2, seq=6)
    neurons = attribute(model, task, "eap-ig-activations", "neuron", batch_size=batch_size)
    nodes = attribute(model, task, "eap-ig-activations", "node", batch_size=batch_size)
    assert_equal_scores(neurons.tensor.sum(1), nodes.tensor, tolerance=1e-5)
    assert nodes.tensor.abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "opt", NATIVE])  # each MLP's write is linear in its units
@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "clean-corrupted"])
def test_mlp_neuron_scores_of_an_mlp_sum_to_its_node_score(method, arch, task):
    """The MLP's write W h + b changes by W (h - h_patch) under patching: its node score is -(h - h_patch) . dM/dh,
    the sum of its hidden units' scores (every gradient point's gradient reaches h through W)."""
    model = model_of(arch)
    hidden = attribute(model, task, method, "mlp-neuron")
    nodes = attribute(model, task, method, "node")
    mlps = nodes.tensor[[slots.mlp_source for slots in model.graph.layers]]
    assert hidden.tensor.shape == (model.graph.n_layers, mlp_width(model))
    assert_equal_scores(hidden.tensor.sum(1), mlps, tolerance=1e-5)
    assert mlps.abs().max() > 1e-3


# --- 2. gradient neuron scores against the per-destination gradients of the hook oracle --------------------------


def oracle_neuron_scores(model, task, alphas):
    """``sum_v real[u, v] sum_{b,t} (out_u - patch_u)[b,t,d] * d metric / d z_v[b,t,d]`` averaged over the points
    (``z_v`` a zero probe subtracted from v's input: its gradient is minus the input's; the metric a mean)."""
    graph, oracle, tokens = model.graph, Oracle(model.hf), task.tokenize()
    clean = oracle.source_outputs(graph.sources, tokens.clean_ids, tokens.attention_mask)
    patch = oracle.source_outputs(graph.sources, tokens.corrupted_ids, tokens.attention_mask)
    scores = torch.zeros(graph.n_src, model.adapter.d_model, dtype=torch.float64)
    for alpha in alphas:
        _, grads = oracle_point(model, oracle, tokens, clean, patch, alpha, 1.0)
        for u, src in enumerate(graph.sources):
            readers = [grads[dst].double() for j, dst in enumerate(graph.destinations) if graph.real[u, j]]
            delta = (clean[src] - patch[src]).double()
            scores[u] += (delta * sum(readers)).sum((0, 1)) / len(alphas)
    return scores.float()


@pytest.mark.parametrize("arch", ARCHS)
def test_eap_neuron_scores_equal_the_hook_oracle(arch, task):
    model = model_of(arch)
    expected = oracle_neuron_scores(model, task, [1.0])
    assert expected.abs().max() > 1e-2
    assert_equal_scores(attribute(model, task, "eap").tensor, expected)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_eap_ig_inputs_neuron_scores_equal_the_hook_oracle(arch, task):
    model = model_of(arch)
    expected = oracle_neuron_scores(model, task, [k / STEPS for k in range(STEPS)])
    assert_equal_scores(attribute(model, task, "eap-ig-inputs").tensor, expected)


# --- 3. gradient mlp-neuron scores against hidden-unit gradients from hooks ------------------------------------


def oracle_hidden_gradients(oracle, tokens, input_value=None):
    """``d metric / d h_l`` ``[B, T, d_mlp]`` for every MLP's hidden units (a zero probe added to the input of its
    output projection), with the first block's input replaced by ``input_value`` if given."""
    n_layers, probes = len(oracle.lay.layers), {}

    def probe(layer, module, args):
        probes[layer] = torch.zeros_like(args[0], requires_grad=True)
        return (args[0] + probes[layer], *args[1:])

    def replace_input(module, args, kwargs):
        return ((input_value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": input_value})

    with ExitStack() as stack:
        for layer in range(n_layers):
            hook = oracle._hidden_module(layer).register_forward_pre_hook(lambda m, a, layer=layer: probe(layer, m, a))
            stack.callback(hook.remove)
        if input_value is not None:
            hook = oracle.lay.layers[0].register_forward_pre_hook(replace_input, with_kwargs=True)
            stack.callback(hook.remove)
        logits = oracle.hf(tokens.clean_ids, attention_mask=tokens.attention_mask).logits
    value = metric_values("logit_diff", logits[torch.arange(len(tokens)), tokens.positions], tokens).mean()
    grads = torch.autograd.grad(value, [probes[layer] for layer in range(n_layers)])
    return [grad.reshape(*tokens.clean_ids.shape, -1) for grad in grads]  # OPT: from the flattened [B*T, d_mlp]


def oracle_hidden_scores(model, task, ablation="patching", alphas=(1.0,)):
    """``sum_{b,t} (h_patch - h_clean)[b,t,j] * d metric / d h[b,t,j]`` averaged over the input points."""
    oracle, tokens = Oracle(model.hf), task.tokenize()
    ids, corrupted, mask = tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask
    n_layers = model.graph.n_layers
    clean = [oracle.hidden_units(layer, ids, mask).double() for layer in range(n_layers)]
    if ablation == "patching":
        patch = [oracle.hidden_units(layer, corrupted, mask).double() for layer in range(n_layers)]
    elif ablation == "mean":
        weights = mask[..., None].double()
        patch = [(h * weights).sum((0, 1)) / weights.sum() for h in clean]
    else:
        patch = [torch.zeros_like(h) for h in clean]
    inputs = oracle.source_outputs(["input"], ids, mask)["input"]
    corrupted_inputs = oracle.source_outputs(["input"], corrupted, mask)["input"]
    scores = torch.zeros(n_layers, mlp_width(model), dtype=torch.float64)
    for alpha in alphas:
        point = None if alpha == 1.0 else corrupted_inputs + alpha * (inputs - corrupted_inputs)
        for layer, grad in enumerate(oracle_hidden_gradients(oracle, tokens, point)):
            scores[layer] += ((patch[layer] - clean[layer]) * grad.double()).sum((0, 1)) / len(alphas)
    return scores.float()


@pytest.mark.parametrize("arch", ARCHS)
def test_eap_mlp_neuron_scores_equal_the_hook_oracle(arch, task):
    model = model_of(arch)
    expected = oracle_hidden_scores(model, task)
    assert expected.abs().max() > 1e-3
    assert_equal_scores(attribute(model, task, "eap", "mlp-neuron").tensor, expected)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_eap_mlp_neuron_scores_with_mean_and_zero_ablation_equal_the_hook_oracle(ablation, task):
    model = model_of("llama")
    expected = oracle_hidden_scores(model, task, ablation)
    assert expected.abs().max() > 1e-3
    got = attribute(model, task, "eap", "mlp-neuron", ablation=ablation).tensor
    assert_equal_scores(got, expected, tolerance=1e-4)


def test_eap_ig_inputs_mlp_neuron_scores_equal_the_hook_oracle(task):
    model = model_of("gpt2")
    expected = oracle_hidden_scores(model, task, alphas=[k / STEPS for k in range(STEPS)])
    assert_equal_scores(attribute(model, task, "eap-ig-inputs", "mlp-neuron").tensor, expected)


# --- 4. exact scores against the oracle's patched runs ------------------------------------------------------------


def only_units(monkeypatch, chosen):
    """Let the exact method run the ``chosen`` units only (the others keep score 0)."""
    every = exact._units
    monkeypatch.setattr(exact, "_units", lambda *args: [(layer, u) for layer, u in every(*args) if u in chosen])


def neuron_units(graph, d_model):
    last = graph.n_layers - 1
    sources = ["input", "a0.h1", "m0", "a1.h3", f"a{last}.h2", f"m{last}"]
    return [(graph.source_index(src), (7 * k + 3) % d_model) for k, src in enumerate(sources)]


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_neuron_scores_equal_the_oracle(arch, task, monkeypatch):
    model = model_of(arch)
    graph, oracle, tokens = model.graph, Oracle(model.hf), task.tokenize()
    ids, corrupted, mask = tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask
    units = neuron_units(graph, model.adapter.d_model)
    only_units(monkeypatch, set(units))
    got = attribute(model, task, "exact").tensor
    clean = task_metric(task, model.hf(ids, attention_mask=mask).logits.detach())
    expected = torch.zeros_like(got)
    for u, d in units:
        weight = torch.ones(model.adapter.d_model)
        weight[d] = 0
        src = graph.sources[u]
        logits = oracle.patch_source(src, ids, mask, oracle.source_output(src, corrupted, mask), weight)
        expected[u, d] = task_metric(task, logits) - clean
    assert expected.abs().max() > 1e-3
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_mlp_neuron_scores_equal_the_oracle(arch, task, monkeypatch):
    model = model_of(arch)
    oracle, tokens = Oracle(model.hf), task.tokenize()
    ids, corrupted, mask = tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask
    units = [
        (layer, (13 * layer + 5 * k + 2) % mlp_width(model)) for layer in range(model.graph.n_layers) for k in (0, 1)
    ]
    only_units(monkeypatch, set(units))
    got = attribute(model, task, "exact", "mlp-neuron").tensor
    clean = task_metric(task, model.hf(ids, attention_mask=mask).logits.detach())
    expected = torch.zeros_like(got)
    for layer, j in units:
        value = oracle.hidden_units(layer, corrupted, mask)[..., j]
        expected[layer, j] = task_metric(task, oracle.patch_hidden(layer, j, ids, mask, value)) - clean
    assert expected.abs().max() > 1e-4
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, float(expected.abs().max())))


# --- 5. EAP and exact agree to first order ----------------------------------------------------------------------


def shrunk_scores(model, task, level, eps, units):
    """EAP's and exact's scores of ``units`` with the ablation values moved to clean + eps (patch - clean)."""
    batch = next(batches(model, task, "patching", len(task), hidden=level == "mlp-neuron"))
    ids, mask = batch.tokens.clean_ids, batch.tokens.attention_mask
    if level == "neuron":
        clean = source_outputs(model, ids, mask)
        batch.patch = clean + eps * (batch.patch - clean)
    else:
        clean = mlp_hidden_values(model, ids, mask)
        batch.hidden_patch = clean + eps * (batch.hidden_patch - clean)
    resolution = Resolution(level)
    shape = torch.Size(resolution.shape(model))
    eap = gradient._batch_scores(model, task, batch, "eap", 1, resolution=resolution)
    by_layer: dict[int, list] = {}
    for layer, unit in exact._units(model.graph, resolution, shape[-1]):
        if unit in units:
            by_layer.setdefault(layer, []).append(unit)
    effects = exact._batch_effects(shape, model, task, batch, by_layer, level, exact.MAX_TOKENS, False, resolution)
    rows, columns = zip(*units, strict=True)
    return eap[rows, columns].double(), effects[rows, columns].double()


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
@pytest.mark.parametrize("arch", ["llama", "neox", "gemma2", "native-bidirectional"])
def test_eap_and_exact_agree_to_first_order(arch, level, task):
    """exact = EAP + O(eps^2): exact / eps - EAP / eps shrinks in proportion to eps (float64)."""
    model = model_of(arch, double=True)
    if level == "neuron":
        units = [(u, d) for u in range(model.graph.n_src) for d in (u % 7, 16 + u % 11)]
    else:
        units = [(layer, j) for layer in range(model.graph.n_layers) for j in range(layer, mlp_width(model), 6)]
    gaps = []
    for eps in EPSILONS:
        eap, effects = shrunk_scores(model, task, level, eps, units)
        scale = float((eap / eps).abs().max())
        assert scale > 1e-2
        gaps.append(float((effects / eps - eap / eps).abs().max()) / scale)
    # the gap shrinks in proportion to eps (a wrong sign, factor or unit would keep it): about 10x here, and small
    assert gaps[1] < 0.3 * gaps[0], gaps
    assert gaps[1] < 25 * EPSILONS[1], gaps  # gemma2's output dimensions, the most curved: 18 eps


# --- 6. selection and evaluation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neuron_scores(task):
    model = model_of("llama")
    return {level: attribute(model, task, "eap", level) for level in ("neuron", "mlp-neuron")}


def units_of(model, level):
    return model.graph.n_src * model.adapter.d_model if level == "neuron" else model.graph.n_layers * mlp_width(model)


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_most_helpful_keeps_exactly_n_neurons(level, neuron_scores):
    scores = neuron_scores[level]
    for n in (1, 17, len(scores)):
        circuit = scores.most_helpful(n)
        assert circuit.level == level and len(circuit) == n and len(circuit.units) == n
        assert int(circuit.mask.sum()) == n
    circuit = scores.most_helpful(17)
    # the task's higher metric is better: the 17 most negative scores, nothing pruned
    assert sorted(scores[name] for name in circuit.units) == sorted(scores.values().tolist())[:17]
    assert circuit.meta["selection"]["edges_before_pruning"] == circuit.meta["selection"]["edges_after_pruning"]


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_top_n_and_threshold_select_neurons_by_absolute_score(level, neuron_scores):
    scores = neuron_scores[level]
    magnitudes = scores.tensor.abs()
    top = scores.top_n(10)
    assert top.level == level and len(top) == 10
    assert bool(magnitudes[top.mask].min() >= magnitudes[~top.mask].max())
    cut = float(magnitudes.flatten().sort(descending=True).values[24])
    kept = scores.threshold(cut)
    assert kept.level == level and torch.equal(kept.mask, magnitudes >= cut) and len(kept) == 25
    nodes = dict.fromkeys(name.rpartition(".")[0] for name in kept.units)  # a0.h1 (neuron), m3 (mlp-neuron)
    assert sorted(kept.nodes) == sorted(nodes)


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_circuits_of_every_neuron_and_of_none_have_faithfulness_one_and_zero(level, neuron_scores, task):
    model = model_of("llama")
    shape = neuron_scores[level].tensor.shape
    every = circuits.evaluate(model, task, Circuit(model.graph, torch.ones(shape), level=level))
    none = circuits.evaluate(model, task, Circuit(model.graph, torch.zeros(shape), level=level))
    assert abs(every.full - every.empty) > 1e-2
    assert every.faithfulness == pytest.approx(1, abs=1e-5) and every.edges == units_of(model, level)
    assert none.faithfulness == pytest.approx(0, abs=1e-5) and none.edges == 0


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_evaluate_equals_the_metric_of_a_direct_patched_forward(level, neuron_scores, task):
    """The circuit's units kept, every other unit of its level ablated; the empty circuit ablates every unit of the
    level (at mlp-neuron every hidden unit, attention kept)."""
    model = model_of("llama")
    circuit = neuron_scores[level].most_helpful(40)
    result = circuits.evaluate(model, task, circuit)
    tokens = task.tokenize()
    ids, corrupted, mask = tokens.clean_ids, tokens.corrupted_ids, tokens.attention_mask
    if level == "neuron":
        ablation = {"patch": patching_values(model, mask, corrupted, mask)}
        key = "neuron_mask"
    else:
        ablation = {"hidden_patch": mlp_hidden_values(model, corrupted, mask)}
        key = "hidden_mask"

    def direct(unit_mask):
        with torch.no_grad():
            logits = patched_forward(
                model, ids, mask, logit_positions=tokens.positions, **ablation, **{key: unit_mask.float()}
            ).logits
        return task_metric(task, logits)

    assert result.circuit == pytest.approx(direct(circuit.mask), abs=1e-5)
    assert result.empty == pytest.approx(direct(torch.zeros_like(circuit.mask)), abs=1e-5)
    assert result.full == pytest.approx(task_metric(task, model.hf(ids, attention_mask=mask).logits.detach()), abs=1e-5)
    assert result.circuit != pytest.approx(result.empty, abs=1e-3)
    if level == "mlp-neuron":  # attention kept: not the edge level's empty circuit
        edge_empty = circuits.evaluate(model, task, Circuit(model.graph, torch.zeros_like(model.graph.real))).empty
        assert result.empty != pytest.approx(edge_empty, abs=1e-3)


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_faithfulness_curve_counts_neurons_and_gives_finite_cpr_and_cmd(level, neuron_scores, task):
    model = model_of("llama")
    fractions = (0.01, 0.1, 0.5, 1.0)
    curve = circuits.faithfulness_curve(model, task, neuron_scores[level], fractions=fractions)
    total = units_of(model, level)
    assert curve.meta["units"] == total
    assert curve.frame["edges"].tolist() == [max(1, round(f * total)) for f in fractions]
    assert curve.frame["edges_after_pruning"].tolist() == curve.frame["edges"].tolist()
    assert torch.isfinite(torch.tensor([curve.cpr, curve.cmd])).all()
    assert curve.frame["faithfulness"].iloc[-1] == pytest.approx(1, abs=1e-5)


# --- 7. export --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_save_writes_every_row_of_units_with_its_level(level, neuron_scores, tmp_path):
    model = model_of("llama")
    circuit = neuron_scores[level].most_helpful(30)
    data = json.loads(circuit.save(tmp_path / "circuit.json").read_text())
    rows = data["sources" if level == "neuron" else "mlps"]
    assert data["level"] == level
    names = model.graph.sources if level == "neuron" else [f"m{layer}" for layer in range(model.graph.n_layers)]
    assert list(rows) == names
    assert torch.equal(torch.tensor([rows[name]["in_graph"] for name in names]), circuit.mask)
    assert torch.allclose(torch.tensor([rows[name]["scores"] for name in names]), circuit.scores)


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_save_and_load_round_trip_keeps_mask_scores_and_level(level, neuron_scores, tmp_path):
    model = model_of("llama")
    circuit = neuron_scores[level].most_helpful(30)
    loaded = Circuit.load(circuit.save(tmp_path / "circuit.json"), model)
    assert loaded.level == level
    assert torch.equal(loaded.mask, circuit.mask)
    assert torch.equal(loaded.scores, circuit.scores)
    assert loaded.units == circuit.units


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_networkx_and_dot_refuse_neuron_circuits(level, neuron_scores):
    circuit = neuron_scores[level].most_helpful(5)
    with pytest.raises(CircuitsError, match="to_frame"):
        circuit.to_networkx()
    with pytest.raises(CircuitsError, match="to_frame"):
        circuit.to_dot()


@pytest.mark.parametrize("level", ["neuron", "mlp-neuron"])
def test_to_frame_lists_name_node_unit_and_score(level, neuron_scores):
    scores = neuron_scores[level]
    circuit = scores.most_helpful(12)
    frame = circuit.to_frame()
    assert list(frame.columns) == ["name", "node", "unit", "score"]
    assert frame["name"].tolist() == circuit.units
    for name, node, unit, score in frame.itertuples(index=False):
        assert name == f"{node}.{'d' if level == 'neuron' else 'n'}{unit}"
        assert score == pytest.approx(scores[name])
    whole = scores.to_frame()
    assert whole["name"].tolist() == scores.names() and len(whole) == len(scores)


# --- 8. refusals before any work --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "method", "level", "options", "match"),
    [
        ("mixtral", "eap", "mlp-neuron", {}, "mixture of experts"),
        ("olmoe", "exact", "mlp-neuron", {}, "mixture of experts"),
        ("llama", "eap", "neuron", {"positions": True}, "positions resolve edges"),
        ("llama", "exact", "mlp-neuron", {"positions": True}, "positions resolve edges"),
        ("llama", "eap-ig-activations", "mlp-neuron", {}, "hidden units"),
    ],
)
def test_refused_before_any_forward(arch, method, level, options, match, task):
    model = model_of(arch)
    with forwards_counted() as calls, pytest.raises(CircuitsError, match=match):
        attribute(model, task, method, level, **options)
    assert calls == []


def test_eap_ig_activations_refuses_the_mlp_neuron_level(task):
    with pytest.raises(CircuitsError, match="eap-ig-activations interpolates the sources' outputs"):
        attribute(model_of("llama"), task, "eap-ig-activations", "mlp-neuron")


@pytest.mark.parametrize(
    ("level", "name", "match"),
    [
        ("neuron", "a0.h1.x3", "is no neuron name"),
        ("neuron", "a0.h1", "is no neuron name"),
        ("neuron", "a0.h1.d", "is no neuron name"),
        ("neuron", "zz.d3", "unknown source node"),
        ("mlp-neuron", "m0.d1", "is no mlp-neuron name"),
        ("mlp-neuron", "m9.n1", "no MLP 'm9'"),
        ("mlp-neuron", "a0.n1", "no MLP 'a0'"),
    ],
)
def test_a_malformed_neuron_name_is_refused(level, name, match, neuron_scores):
    with pytest.raises(CircuitsError, match=match):
        neuron_scores[level][name]


@pytest.mark.parametrize(("level", "name"), [("neuron", "a0.h1.d32"), ("mlp-neuron", "m0.n48")])
def test_a_neuron_name_out_of_range_is_refused(level, name, neuron_scores):
    with pytest.raises(CircuitsError):
        neuron_scores[level][name]


def test_the_neuron_figure_shows_the_top_neurons_by_magnitude(neuron_scores, tmp_path):
    from circuits.plot import plot_neurons

    scores = neuron_scores["neuron"]
    figure = plot_neurons(scores, tmp_path / "top.png", top=7)
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert labels == scores.top_edges(7)
    assert (tmp_path / "top.png").stat().st_size > 0


def test_a_neuron_circuit_of_another_width_is_refused_before_any_batch(neuron_scores):
    from circuits.circuit import Circuit

    scores = neuron_scores["neuron"]
    model = model_of("llama")
    other = Circuit(
        model.graph, torch.ones(model.graph.n_src, scores.tensor.shape[1] + 1, dtype=torch.bool), level="neuron"
    )
    with forwards_counted() as calls, pytest.raises(CircuitsError, match="made on another model"):
        circuits.evaluate(model, tiny_task(), other)
    assert calls == []
