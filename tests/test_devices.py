"""Models on several devices: layers offloaded to the CPU or disk (accelerate), checked against the model in memory.

A tiny model is saved, then loaded with layer 0 in memory and the other layers on disk (weights loaded for
their layer only); every result must equal the in-memory model's. Multi-GPU checks run where there are GPUs.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import AlignDevicesHook

import circuits
from circuits.cli import main
from circuits.native import NativeConfig, NativeTransformer
from circuits.placement import _MoveExpanded
from circuits.testing import tiny_hf, tiny_pair

ARCHS = ["llama", "gpt2", "neox"]
SCORED = ["eap", "eap-ig-inputs", "exact"]


def split_map(model: circuits.Model, layer_device, other_device=lambda module: "cpu") -> dict:
    """A device map placing each layer block with ``layer_device(layer)`` and every other module with
    ``other_device(module)`` (the CPU)."""
    blocks = {id(model.adapter.layer_module(i)): i for i in range(model.adapter.n_layers)}
    device_map = {}

    def place(name: str, module: torch.nn.Module) -> None:
        if id(module) in blocks:
            device_map[name] = layer_device(blocks[id(module)])
        elif not any(id(m) in blocks for m in module.modules()):
            device_map[name] = other_device(module)
        else:
            for child_name, child in module.named_children():
                place(f"{name}.{child_name}" if name else child_name, child)

    place("", model.hf)
    return device_map


def on_disk_after_layer_0(layer: int) -> str:
    return "cpu" if layer == 0 else "disk"


def make_task(batch: int = 4, seq: int = 8) -> circuits.Task:
    clean, corrupted, mask = tiny_pair(batch=batch, seq=seq, seed=1)
    lengths = mask.sum(1).tolist()
    clean_ids = [row[:n].tolist() for row, n in zip(clean, lengths, strict=True)]
    corrupted_ids = [row[:n].tolist() for row, n in zip(corrupted, lengths, strict=True)]
    answers = [int(row[0]) for row in clean]
    wrong = [(a + 7) % 60 + 1 for a in answers]
    return circuits.Task.from_token_ids("tiny", clean_ids, corrupted_ids, answers, wrong)


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    """(the model in memory, the same weights loaded with layers 1.. offloaded to disk)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = tiny_hf(request.param)
    hf.save_pretrained(folder / "model")
    in_memory = circuits.Model.from_hf(hf)
    device_map = split_map(in_memory, on_disk_after_layer_0)
    offloaded = circuits.load_model(
        str(folder / "model"), device_map=device_map, offload_folder=folder / "offload", dtype=torch.float32
    )
    return in_memory, offloaded


@pytest.fixture(scope="module")
def task():
    return make_task()


def random_mask(model: circuits.Model) -> torch.Tensor:
    graph = model.graph
    return (torch.rand(graph.n_src, graph.n_dst, generator=torch.Generator().manual_seed(0)) < 0.5).float()


def block_parameters(model: circuits.Model, layer: int) -> list[torch.Tensor]:
    return list(model.adapter.layer_module(layer).parameters())


def test_offloaded_layers_run_in_stages_and_the_rest_in_place(models):
    _, offloaded = models
    placement = offloaded.placement
    assert placement.home == offloaded.device == torch.device("cpu")
    assert placement.layers[0] is None
    assert all(stage.offloaded for stage in placement.layers[1:])
    assert all(p.device.type == "meta" for p in block_parameters(offloaded, 2))


@pytest.mark.parametrize("mask", ["all ones", "random"])
def test_offloaded_model_logits_equal_the_in_memory_model(models, mask):
    in_memory, offloaded = models
    clean, corrupted, attention = tiny_pair()
    edge_mask = (
        torch.ones(in_memory.graph.n_src, in_memory.graph.n_dst) if mask == "all ones" else random_mask(in_memory)
    )
    with torch.no_grad():
        patch = circuits.engine.source_outputs(in_memory, corrupted, attention)
        expected = circuits.patched_forward(in_memory, clean, attention, edge_mask, patch).logits
        logits = circuits.patched_forward(offloaded, clean, attention, edge_mask, patch).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", SCORED)
def test_offloaded_model_scores_equal_the_in_memory_model(models, task, method):
    in_memory, offloaded = models
    expected = circuits.attribute(in_memory, task, method, ig_steps=3, batch_size=4, progress=False).tensor
    scores = circuits.attribute(offloaded, task, method, ig_steps=3, batch_size=4, progress=False).tensor
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6, equal_nan=True)


def test_offloaded_acdc_equals_the_in_memory_model(models, task):
    in_memory, offloaded = models
    expected = circuits.acdc(in_memory, task, threshold=0.01, batch_size=4, progress=False)
    circuit = circuits.acdc(offloaded, task, threshold=0.01, batch_size=4, progress=False)
    assert sorted(circuit.edges) == sorted(expected.edges) and len(circuit.edges) > 0


def test_offloaded_weights_are_freed_and_hooks_restored_after_each_layer(models):
    in_memory, offloaded = models
    clean, _, attention = tiny_pair()
    with torch.no_grad():
        circuits.patched_forward(offloaded, clean, attention, random_mask(offloaded))
        assert all(p.device.type == "meta" for p in block_parameters(offloaded, 1))
        hooks = [m._hf_hook for m in offloaded.adapter.layer_module(1).modules() if hasattr(m, "_hf_hook")]
        assert hooks and all(isinstance(hook, AlignDevicesHook) for hook in hooks)
        own = offloaded.hf(clean, attention_mask=attention).logits  # the model's own forward still loads them
        torch.testing.assert_close(own, in_memory.hf(clean, attention_mask=attention).logits, rtol=0, atol=1e-6)


def test_offloaded_weights_are_not_held_until_backward(models, monkeypatch):
    _, offloaded = models
    loaded = []
    release = AlignDevicesHook.post_forward

    def remember(self, module, output):
        if self.offload:
            loaded.extend(weakref.ref(p) for p in module.parameters(recurse=False))
        return release(self, module, output)

    monkeypatch.setattr(AlignDevicesHook, "post_forward", remember)
    clean, _, attention = tiny_pair()
    embeddings = offloaded.adapter.embed(clean, torch.arange(clean.shape[1]).expand_as(clean)).detach()
    run = circuits.patched_forward(offloaded, clean, attention, input_embeddings=embeddings.requires_grad_(True))
    gc.collect()
    assert loaded and not any(ref() is not None for ref in loaded)
    run.logits.sum().backward()  # reloads them
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert all(p.requires_grad for p in block_parameters(offloaded, 1))


def test_moving_a_read_shared_by_several_destinations_keeps_a_gradient_for_each():
    stream = torch.randn(1, 2, 3, requires_grad=True)
    shared = stream.expand(4, 2, 3)  # four destinations read the same stream, each with a gradient of its own
    received = []
    shared.register_hook(received.append)
    moved = _MoveExpanded.apply(shared, torch.device("cpu"))
    (moved * torch.arange(4.0)[:, None, None]).sum().backward()
    assert moved.shape == (4, 2, 3) and moved.stride(0) == 0  # one stream moved, not four copies
    torch.testing.assert_close(received[0], torch.arange(4.0)[:, None, None].expand(4, 2, 3))


def test_layer_failing_midway_restores_hooks_and_frees_weights(models, monkeypatch):
    in_memory, offloaded = models
    clean, _, attention = tiny_pair()
    adapter, real_mlp = offloaded.adapter, offloaded.adapter.mlp

    def failing(layer, x):
        if layer == 1:
            raise RuntimeError("out of memory")
        return real_mlp(layer, x)

    monkeypatch.setattr(adapter, "mlp", failing)
    with torch.no_grad(), pytest.raises(RuntimeError, match="out of memory"):
        circuits.patched_forward(offloaded, clean, attention)
    monkeypatch.undo()
    assert all(p.device.type == "meta" for p in block_parameters(offloaded, 1))
    with torch.no_grad():
        logits = circuits.patched_forward(offloaded, clean, attention).logits
        torch.testing.assert_close(
            logits, circuits.patched_forward(in_memory, clean, attention).logits, rtol=0, atol=1e-6
        )


def test_auto_device_map_with_little_memory_offloads_to_disk(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "model")
    model = circuits.load_model(
        str(tmp_path / "model"), device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in model.hf.hf_device_map.values() and model.placement is not None
    clean, _, attention = tiny_pair()
    with torch.no_grad():
        expected = circuits.patched_forward(circuits.Model.from_hf(hf), clean, attention).logits
        torch.testing.assert_close(
            circuits.patched_forward(model, clean, attention).logits, expected, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_dispatched_by_the_user_works_through_from_hf(arch, tmp_path):
    in_memory = circuits.Model.from_hf(tiny_hf(arch))
    hf = dispatch_model(tiny_hf(arch), split_map(in_memory, on_disk_after_layer_0), offload_dir=str(tmp_path))
    model = circuits.Model.from_hf(hf)
    clean, _, attention = tiny_pair()
    with torch.no_grad():
        expected = circuits.patched_forward(in_memory, clean, attention, random_mask(in_memory)).logits
        logits = circuits.patched_forward(model, clean, attention, random_mask(model)).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_cpu_offloaded_model_works_through_from_hf(task):
    in_memory = circuits.Model.from_hf(tiny_hf("qwen3"))
    model = circuits.Model.from_hf(cpu_offload(tiny_hf("qwen3"), execution_device="cpu"))
    assert all(stage.offloaded for stage in model.placement.layers)
    expected = circuits.attribute(in_memory, task, "eap", batch_size=4, progress=False).tensor
    scores = circuits.attribute(model, task, "eap", batch_size=4, progress=False).tensor
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6, equal_nan=True)


def test_model_on_one_device_has_no_placement(tmp_path):
    hf = tiny_hf("gpt2")
    assert circuits.Model.from_hf(hf).placement is None
    hf.save_pretrained(tmp_path)
    model = circuits.load_model(str(tmp_path), device_map="cpu")
    assert model.placement is None and model.device == torch.device("cpu")


# --- what is refused, and how -----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_hf("llama").save_pretrained(folder)
    return str(folder)


def test_unknown_device_in_a_device_map_is_named(saved_llama):
    with pytest.raises(circuits.CircuitsError, match=r"device_map\['model.layers.0'\]: unknown device 'gpu'"):
        circuits.load_model(saved_llama, device_map={"model.layers.0": "gpu", "": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_gpu_index_in_a_device_map_without_gpus_is_named(saved_llama):
    with pytest.raises(circuits.CircuitsError, match=r"device_map\['lm_head'\] = 1: a GPU index, but there are 0"):
        circuits.load_model(saved_llama, device_map={"lm_head": 1, "model": "cpu"})


def test_disk_offload_without_offload_folder_is_named(saved_llama):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    with pytest.raises(
        circuits.CircuitsError, match=r"puts model.layers.1, model.layers.2 on disk: pass offload_folder"
    ):
        circuits.load_model(saved_llama, device_map=split_map(model, on_disk_after_layer_0))


def test_device_and_device_map_together_are_refused(saved_llama):
    with pytest.raises(circuits.CircuitsError, match="pass device or device_map, not both"):
        circuits.load_model(saved_llama, device="cpu", device_map="auto")


@pytest.mark.parametrize("option", ["max_memory", "offload_folder"])
def test_offload_options_without_a_device_map_are_refused(saved_llama, option, tmp_path):
    value = {"cpu": "1GiB"} if option == "max_memory" else tmp_path
    with pytest.raises(circuits.CircuitsError, match=f"{option} goes with a device_map"):
        circuits.load_model(saved_llama, **{option: value})


def test_layer_split_across_devices_is_refused():
    hf = tiny_hf("llama")
    hf.model.layers[0].mlp._hf_hook = AlignDevicesHook(execution_device="cuda:1")  # as a device map splitting it
    with pytest.raises(circuits.CircuitsError, match="layer 0 is spread over cpu, cuda:1.*place whole layers"):
        circuits.Model.from_hf(hf)


def test_native_model_on_several_devices_is_refused(tmp_path):
    native = NativeTransformer(NativeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, vocab_size=20))
    native.save(tmp_path)
    with pytest.raises(circuits.CircuitsError, match="native model, which loads on one device"):
        circuits.load_model(str(tmp_path), device_map="auto")
    with pytest.raises(circuits.CircuitsError, match="runs on one device"):
        circuits.Model.from_hf(cpu_offload(native, execution_device="cpu"))


# --- the command line ------------------------------------------------------------------------


def test_cli_discovers_with_layers_offloaded_to_disk(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "model")
    device_map = split_map(circuits.Model.from_hf(hf), on_disk_after_layer_0)
    status = main(
        ["discover", "--model", str(tmp_path / "model"), "--task", "induction", "--n", "4", "--method", "eap",
         "--top-n", "10", "--device-map", json.dumps(device_map), "--offload-folder", str(tmp_path / "offload"),
         "--out", str(tmp_path / "out"), "--quiet"]
    )  # fmt: skip
    assert status == 0 and (tmp_path / "out" / "circuit.json").exists()


def test_cli_offload_folder_without_device_map_is_one_error_line(tmp_path, capsys):
    status = main(
        ["discover", "--model", str(tmp_path), "--task", "induction", "--offload-folder", str(tmp_path),
         "--out", str(tmp_path / "out"), "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        "circuits discover: error: --offload-folder goes with --device-map"
    ]


# --- several GPUs (skipped where there are fewer) ---------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("arch", ARCHS)
def test_model_split_over_two_gpus_equals_one_gpu(arch, task, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hf = tiny_hf(arch)
    hf.save_pretrained(tmp_path)
    one = circuits.Model.from_hf(hf.to("cuda:0"))
    ends = {id(m) for m in [*one.adapter.input_modules(), hf.get_output_embeddings()]}
    # embedding and head on GPU 0, layers on 1, 0, 1, final norm (and the rest) on 1
    device_map = split_map(one, lambda layer: 1 - layer % 2, lambda module: 0 if id(module) in ends else 1)
    split = circuits.load_model(str(tmp_path), device_map=device_map)
    assert split.device == torch.device("cuda", 0) and split.placement.layers[0].device == torch.device("cuda", 1)
    for method in SCORED:
        expected = circuits.attribute(one, task, method, ig_steps=3, batch_size=4, progress=False).tensor
        scores = circuits.attribute(split, task, method, ig_steps=3, batch_size=4, progress=False).tensor
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_layers_offloaded_to_the_cpu_run_on_the_gpu(task, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path)
    one = circuits.Model.from_hf(hf.to("cuda:0"))
    device_map = {k: (0 if v == "cpu" else "cpu") for k, v in split_map(one, on_disk_after_layer_0).items()}
    offloaded = circuits.load_model(str(tmp_path), device_map=device_map)
    assert offloaded.device == torch.device("cuda", 0) and offloaded.placement.layers[1].offloaded
    expected = circuits.attribute(one, task, "eap", batch_size=4, progress=False).tensor
    scores = circuits.attribute(offloaded, task, "eap", batch_size=4, progress=False).tensor
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
