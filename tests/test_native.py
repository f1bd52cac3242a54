"""The native transformer: its forward, the engine's invariants on it, files, configs, ground-truth loading.

The reference here is written independently of both ``circuits.native`` and the engine: a
loop-based forward over the weight tensors that evaluates the patching equation literally,
node by node and (for attention) query by query. The engine tests of ``test_engine.py`` that
need no hook oracle also run here, on the native configurations (the ``tiny`` fixture below
overrides the HF one for this module).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine import (  # noqa: F401  (collected again here, on native models)
    test_empty_mask_with_patching_reproduces_corrupted_logits,
    test_full_mask_reproduces_hf_logits,
    test_full_mask_requiring_grad_reproduces_hf_logits,
    test_grad_hook_gives_destination_input_gradients,
    test_logit_positions_select_rows,
    test_mask_entries_outside_real_edges_are_ignored,
    test_mean_values_average_real_positions,
    test_padding_does_not_change_real_positions,
    test_prefix_cache_runs_equal_full_runs,
    test_source_outputs_sum_to_the_final_residual_stream,
    test_with_and_without_autograd_give_the_same_logits,
)

import circuits
import circuits.ground_truth as ground_truth
from circuits.arch.native import NativeAdapter
from circuits.native import NativeConfig, NativeTransformer
from circuits.testing import NATIVE_ARCHITECTURES, NATIVE_CONFIGS, VOCAB, tiny_native, tiny_pair

ATOL = 1e-4


@pytest.fixture(scope="module", params=NATIVE_ARCHITECTURES)
def native_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny(native_name) -> circuits.Model:
    return circuits.Model.from_hf(tiny_native(native_name), name=native_name)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


# --- the independent reference ----------------------------------------------------------------------


def layer_norm(x, module):
    if isinstance(module, torch.nn.Identity):
        return x
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def reference(hf, ids, mask, edge_weights=None, ablation=None):
    """Logits ``[B, T, V]`` and source outputs ``{name: [B, T, D]}`` by the patching equation, literally.

    Destination v reads ``const + sum_u w_uv out_u + (1 - w_uv) ablation_u`` (``w`` defaults to 1,
    ``ablation`` to zero); ``const`` is the sum of the attention output biases computed before v.
    """
    cfg = hf.config
    edge_weights = edge_weights or {}
    batch, seq = ids.shape
    outputs = {"input": hf.embed.weight[ids] + (hf.pos_embed.weight[:seq] if cfg.n_positions else 0)}
    const = torch.zeros(cfg.d_model)

    def read(destination):
        total = const.clone()
        for source, out in outputs.items():
            w = edge_weights.get(f"{source}->{destination}", 1.0)
            patch = torch.zeros_like(out) if ablation is None else ablation[source]
            total = total + w * out + (1 - w) * patch
        return total

    scale = 1 / math.sqrt(cfg.d_head) if cfg.attn_scale is None else cfg.attn_scale
    for layer, block in enumerate(hf.blocks):
        attn = block.attn
        heads = {}
        for h in range(cfg.n_heads):
            xq, xk, xv = (layer_norm(read(f"a{layer}.h{h}<{c}>"), block.ln1) for c in "qkv")
            q = xq @ attn.W_Q[h] + attn.b_Q[h]
            k = xk @ attn.W_K[h] + attn.b_K[h]
            v = xv @ attn.W_V[h] + attn.b_V[h]
            z = torch.zeros(batch, seq, cfg.d_head)
            for b in range(batch):
                allowed = torch.tensor(
                    [[bool(mask[b, s]) and (s <= t or not cfg.causal) for s in range(seq)] for t in range(seq)]
                )
                logits = (q[b] @ k[b].T * scale).masked_fill(~allowed, -math.inf)
                z[b] = torch.softmax(logits, -1) @ v[b]
            heads[f"a{layer}.h{h}"] = z @ attn.W_O[h]
        outputs.update(heads)
        const = const + attn.b_O
        x = layer_norm(read(f"m{layer}"), block.ln2)
        mlp = block.mlp
        outputs[f"m{layer}"] = (
            torch.zeros(batch, seq, cfg.d_model)
            if mlp is None
            else torch.relu(x @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
        )
    return layer_norm(read("logits"), hf.ln_final) @ hf.W_U + hf.b_U, outputs


def engine_logits(model, ids, mask, edge_mask=None, patch=None):
    with torch.no_grad():
        return circuits.patched_forward(model, ids, mask, edge_mask, patch).logits


def ones(model):
    return torch.ones(model.graph.n_src, model.graph.n_dst)


EDGES = [
    "input->a0.h1<q>",
    "input->a0.h0<k>",
    "input->a0.h2<v>",
    "a0.h1->a1.h0<k>",
    "a1.h3->a2.h1<v>",
    "m0->a1.h0<v>",
    "a0.h0->m1",
    "input->m0",
    "a2.h1->logits",
    "m2->logits",
    "input->logits",
]


# --- forward and invariants against the reference --------------------------------------------------


def test_forward_equals_the_loop_reference(tiny, pair):
    clean, _, mask = pair
    with torch.no_grad():
        expected, _ = reference(tiny.hf, clean, mask)
        got = tiny.hf(clean, attention_mask=mask).logits
    assert got.shape == (*clean.shape, tiny.hf.config.vocab_out)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=ATOL)


def test_empty_mask_equals_the_reference_with_every_edge_patched(tiny, pair):
    clean, corrupted, mask = pair
    with torch.no_grad():
        corrupted_logits, corrupted_outputs = reference(tiny.hf, corrupted, mask)
        everything = {edge: 0.0 for edge in tiny.graph.edges}
        expected, _ = reference(tiny.hf, clean, mask, everything, corrupted_outputs)
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    got = engine_logits(tiny, clean, mask, torch.zeros(tiny.graph.n_src, tiny.graph.n_dst), patch)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=ATOL)
    assert torch.allclose(got[real], corrupted_logits[real], atol=ATOL)


def test_single_edge_patches_equal_the_reference(tiny, pair):
    clean, corrupted, mask = pair
    real = mask.bool()
    with torch.no_grad():
        _, corrupted_outputs = reference(tiny.hf, corrupted, mask)
        clean_logits, _ = reference(tiny.hf, clean, mask)
    patch = circuits.engine.patching_values(tiny, mask, corrupted, mask)
    attention_only = tiny.hf.config.d_mlp == 0
    for edge in EDGES:
        edge_mask = ones(tiny)
        edge_mask[tiny.graph.index(edge)] = 0
        got = engine_logits(tiny, clean, mask, edge_mask, patch)
        with torch.no_grad():
            expected, _ = reference(tiny.hf, clean, mask, {edge: 0.0}, corrupted_outputs)
        assert torch.allclose(got[real], expected[real], atol=ATOL), edge
        changes = (expected - clean_logits)[real].abs().max() > 1e-3
        touches_mlp = any(node.startswith("m") for node in edge.split("->"))
        assert changes != (attention_only and touches_mlp), f"{edge}: unexpected (lack of) effect"


def test_fractional_mask_with_zero_ablation_equals_the_reference(tiny, pair):
    clean, _, mask = pair
    weights = {"a0.h1->a1.h0<k>": 0.3, "input->a2.h3<q>": -0.5, "a1.h2->logits": 0.7, "input->m1": 0.2}
    edge_mask = ones(tiny)
    for edge, w in weights.items():
        edge_mask[tiny.graph.index(edge)] = w
    got = engine_logits(tiny, clean, mask, edge_mask, None)
    with torch.no_grad():
        expected, _ = reference(tiny.hf, clean, mask, weights, None)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=ATOL)


def test_source_outputs_equal_the_reference(tiny, pair):
    clean, _, mask = pair
    got = circuits.engine.source_outputs(tiny, clean, mask)
    with torch.no_grad():
        _, expected = reference(tiny.hf, clean, mask)
    for i, name in enumerate(tiny.graph.sources):
        assert torch.allclose(got[i][mask.bool()], expected[name][mask.bool()], atol=ATOL), name


def test_exact_scores_equal_reference_effects(tiny):
    clean, corrupted, mask = tiny_pair(batch=3, seq=6, seed=4)
    lengths = mask.sum(1).tolist()
    rows = [(c[:n].tolist(), r[:n].tolist()) for c, r, n in zip(clean, corrupted, lengths, strict=True)]
    answers, wrong = [1, 2, 3], [4, 5, 6]
    task = circuits.Task.from_token_ids("t", [c for c, _ in rows], [r for _, r in rows], answers, wrong)
    scores = circuits.attribute(tiny, task, "exact", progress=False)
    positions = torch.tensor(lengths) - 1
    picks = torch.arange(3)

    def logit_diff(logits):
        last = logits[picks, positions]
        return (last[picks, torch.tensor(answers)] - last[picks, torch.tensor(wrong)]).mean()

    with torch.no_grad():
        _, corrupted_outputs = reference(tiny.hf, corrupted, mask)
        base = logit_diff(reference(tiny.hf, clean, mask)[0])
        for edge in ("a0.h2->a1.h3<q>", "input->a2.h0<k>", "a1.h1->logits", "m0->a2.h2<v>"):
            patched = logit_diff(reference(tiny.hf, clean, mask, {edge: 0.0}, corrupted_outputs)[0])
            assert scores[edge] == pytest.approx(float(patched - base), abs=1e-4), edge


# --- native-specific behaviour -----------------------------------------------------------------------


def test_attention_only_mlp_edges_score_zero():
    model = circuits.Model.from_hf(tiny_native("native-attn-only"))
    clean, corrupted, mask = tiny_pair(batch=3, seq=6, seed=2)
    lengths = mask.sum(1).tolist()
    task = circuits.Task.from_token_ids(
        "t",
        [c[:n].tolist() for c, n in zip(clean, lengths, strict=True)],
        [c[:n].tolist() for c, n in zip(corrupted, lengths, strict=True)],
        [1, 2, 3],
        [4, 5, 6],
    )
    mlp_edges = [e for e in model.graph.edges if any(n.startswith("m") for n in e.split("->"))]
    for method in ("exact", "eap", "eap-ig-inputs"):
        scores = circuits.attribute(model, task, method, progress=False)
        assert all(abs(scores[e]) < 1e-6 for e in mlp_edges), method  # exact: float rounding of batched copies
        assert any(scores[e] != 0.0 for e in model.graph.edges if e not in mlp_edges), method


def test_bidirectional_attention_reads_later_tokens_and_causal_does_not():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, -1] = 10
    for name, sees_later in (("native-bidirectional", True), ("native-attn-only", False)):
        hf = tiny_native(name)
        with torch.no_grad():
            difference = (hf(ids).logits[0, 0] - hf(changed).logits[0, 0]).abs().max()
        assert (difference > 1e-4) == sees_later, name


def test_bidirectional_models_mask_padding():
    hf = tiny_native("native-bidirectional")
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 30, 40]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask).logits[0, :3]
        alone = hf(ids[:1, :3]).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_attention_scale_is_used():
    hf = tiny_native("native-bidirectional-nopos")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = hf(ids).logits
        hf.config.attn_scale = 0.5
        for block in hf.blocks:
            block.attn.scale = 0.5
        after_model = hf(ids).logits
        after_engine = engine_logits(circuits.Model.from_hf(hf), ids, torch.ones_like(ids))
    assert not torch.allclose(before, after_model, atol=1e-3)
    assert torch.allclose(after_engine, after_model, atol=ATOL)


def test_unembedding_has_d_vocab_out_logits():
    model = circuits.Model.from_hf(tiny_native("native-bidirectional-nopos"))
    logits = engine_logits(model, torch.tensor([[1, 2, 3]]), None)
    assert logits.shape == (1, 3, NATIVE_CONFIGS["native-bidirectional-nopos"]["d_vocab_out"])


def test_sequence_longer_than_positions_is_rejected():
    model = circuits.Model.from_hf(tiny_native("native-attn-only"))
    ids = torch.ones(1, 17, dtype=torch.long)
    with pytest.raises(ValueError, match=r"example 0: the input prompt is 17 tokens long; the model takes at most 16"):
        engine_logits(model, ids, None)


def test_model_from_hf_uses_the_native_adapter_and_weights_in_place():
    hf = tiny_native("native-mlp-ln")
    model = circuits.Model.from_hf(hf, tokenizer=None, name="x")
    assert isinstance(model.adapter, NativeAdapter)
    assert model.adapter.out_weight(1).data_ptr() == hf.blocks[1].attn.W_O.data_ptr()
    assert (model.graph.n_layers, model.graph.n_heads, model.graph.parallel) == (3, 4, False)
    assert "a0.h1->a1.h0<k>" in model.graph.edges and "m0->a1.h0<v>" in model.graph.edges


def test_parameter_shapes_follow_the_spec():
    config = NativeConfig(vocab_size=11, n_layers=2, d_model=12, n_heads=3, d_head=5, d_mlp=7, n_positions=9)
    hf = NativeTransformer(config)
    attn, mlp = hf.blocks[1].attn, hf.blocks[1].mlp
    assert attn.W_Q.shape == attn.W_K.shape == attn.W_V.shape == (3, 12, 5)
    assert attn.b_Q.shape == (3, 5) and attn.W_O.shape == (3, 5, 12) and attn.b_O.shape == (12,)
    assert mlp.W_in.shape == (12, 7) and mlp.b_in.shape == (7,) and mlp.W_out.shape == (7, 12)
    assert hf.W_U.shape == (12, 11) and hf.b_U.shape == (11,) and hf.pos_embed.weight.shape == (9, 12)
    assert isinstance(hf.blocks[0].ln1, torch.nn.Identity) and isinstance(hf.ln_final, torch.nn.Identity)
    assert NativeTransformer(NativeConfig(5, 1, 4, 1, 4, n_positions=0, d_mlp=0)).blocks[0].mlp is None
    assert NativeTransformer(NativeConfig(5, 1, 4, 1, 4, n_positions=0)).pos_embed is None


# --- files ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, native_name):
    hf = tiny_native(native_name)
    hf.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    loaded = NativeTransformer.load(tmp_path / "model")
    assert loaded.config == hf.config
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits)


def test_load_model_reads_a_native_directory(tmp_path):
    hf = tiny_native("native-mlp-ln")
    hf.save(tmp_path)
    model = circuits.load_model(str(tmp_path), device="cpu")
    assert isinstance(model.hf, NativeTransformer) and model.tokenizer is None
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(circuits.patched_forward(model, ids).logits, hf(ids).logits, atol=1e-6)
    assert circuits.load_model(str(tmp_path), device="cpu", dtype=torch.float64).dtype == torch.float64


def test_config_json_holds_the_model_type(tmp_path):
    tiny_native("native-attn-only").save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "circuits-native" and data["d_mlp"] == 0 and data["n_positions"] == 16


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_heads=0), "NativeConfig.n_heads must be an integer >= 1"),
        (dict(d_model=2.5), "NativeConfig.d_model must be an integer"),
        (dict(vocab_size=True), "NativeConfig.vocab_size must be an integer"),
        (dict(n_layers=-1), "NativeConfig.n_layers"),
        (dict(d_head=0), "NativeConfig.d_head"),
        (dict(d_mlp=-3), "NativeConfig.d_mlp must be an integer >= 0"),
        (dict(n_positions=-1), "NativeConfig.n_positions must be an integer >= 0"),
        (dict(layer_norm="yes"), "NativeConfig.layer_norm must be true or false"),
        (dict(causal=1), "NativeConfig.causal must be true or false"),
        (dict(attn_scale=0.0), "NativeConfig.attn_scale must be a positive number"),
        (dict(attn_scale=float("nan")), "NativeConfig.attn_scale"),
        (dict(d_vocab_out=0), "NativeConfig.d_vocab_out must be an integer >= 1"),
    ],
)
def test_bad_config_values_name_the_field(change, message):
    options = dict(vocab_size=10, n_layers=2, d_model=8, n_heads=2, d_head=4) | change
    with pytest.raises(ValueError, match=message):
        NativeConfig(**options)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(n_experts=4), "unknown NativeConfig field 'n_experts'"),
        (lambda c: c.pop("d_head"), "NativeConfig field 'd_head' is missing"),
        (lambda c: c.update(model_type="gpt2"), "model_type is 'gpt2'"),
        (lambda c: c.update(d_model=16), "tensor 'W_U' has shape \\[32, 61\\], the config needs \\[16, 61\\]"),
        (lambda c: c.update(d_mlp=0), "unexpected tensor 'blocks.0.mlp.W_in'"),
        (lambda c: c.update(layer_norm=False), "unexpected tensor 'blocks.0.ln1.bias'"),
    ],
)
def test_bad_saved_configs_are_rejected(tmp_path, edit, message):
    tiny_native("native-mlp-ln").save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    edit(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        NativeTransformer.load(tmp_path)


def test_missing_weights_are_a_clear_error(tmp_path):
    tiny_native("native-attn-only").save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        NativeTransformer.load(tmp_path)


def test_tiny_native_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown tiny native model 'gpt9'"):
        tiny_native("gpt9")


# --- ground-truth directories -----------------------------------------------------------------------------


def write_ground_truth(path, edges, metric="logit_diff"):
    hf = tiny_native("native-bidirectional-nopos")
    hf.save(path)
    task = circuits.Task.from_token_ids("toy", [[1, 2, 3], [4, 5, 6]], [[1, 2, 4], [4, 5, 7]], [1, 2], [3, 4])
    data = ground_truth.task_to_json(task, "a toy", vocab=[f"t{i}" for i in range(VOCAB)], bos=0)
    data["metric"] = metric
    (path / "task.json").write_text(json.dumps(data))
    (path / "truth.json").write_text(json.dumps({"edges": edges, "how": "by hand", "script": "none"}))


def test_ground_truth_directory_loads_model_task_and_edges(tmp_path):
    write_ground_truth(tmp_path, ["a0.h1->a1.h0<k>", "a1.h0->logits"])
    truth = ground_truth.load_directory(tmp_path)
    assert truth.edges == {"a0.h1->a1.h0<k>", "a1.h0->logits"} and truth.how == "by hand"
    assert truth.description == "a toy" and truth.vocab[3] == "t3" and truth.info == {"bos": 0}
    assert len(truth.task) == 2 and truth.task.tokenize().clean_ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert truth.edges <= set(truth.model.graph.edges)
    baseline = truth.task.baseline(truth.model)
    assert math.isfinite(baseline.clean)


@pytest.mark.parametrize(
    "edges, metric, message",
    [
        (["a0.h1->a9.h0<k>"], "logit_diff", "unknown destination node 'a9.h0<k>'"),
        (["a1.h1->a0.h0<q>"], "logit_diff", "does not exist"),
        (["a0.h1->a1.h0<k>"], "accuracy", "task.json: unknown metric 'accuracy'"),
    ],
)
def test_bad_ground_truth_files_are_rejected(tmp_path, edges, metric, message):
    write_ground_truth(tmp_path, edges, metric)
    with pytest.raises(ValueError, match=message):
        ground_truth.load_directory(tmp_path)


def test_unknown_ground_truth_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown ground-truth model 'nope'; available:"):
        ground_truth.load("nope")


def test_inert_nodes_and_scored_edges():
    model = circuits.Model.from_hf(tiny_native("native-mlp-ln"))
    with torch.no_grad():
        model.hf.blocks[1].mlp.W_out.zero_()
        model.hf.blocks[1].mlp.b_out.zero_()
        model.hf.blocks[2].attn.W_O[3].zero_()
    assert ground_truth.inert_sources(model) == {"m1", "a2.h3"}
    live = set(ground_truth.live_edges(model))
    assert "m1->logits" not in live and "a0.h0->m1" not in live and "a2.h3->logits" not in live
    assert "input->a2.h3<q>" not in live and "input->a2.h2<q>" in live and "m0->a1.h1<v>" in live
    attention_only = circuits.Model.from_hf(tiny_native("native-attn-only"))
    assert ground_truth.inert_sources(attention_only) == {"m0", "m1", "m2"}
