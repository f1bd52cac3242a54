"""Bad input to the engine gets a ValueError that names the problem and the offending item."""

from __future__ import annotations

import pytest
import torch

import circuits
from circuits.testing import tiny_hf as make_hf
from circuits.testing import tiny_pair as make_pair


@pytest.fixture(scope="module")
def model():
    return circuits.Model.from_hf(make_hf("llama"))


@pytest.fixture(scope="module")
def batch():
    return make_pair()


def test_pair_length_mismatch_names_the_example(model, batch):
    clean, corrupted, mask = batch
    corrupted_mask = mask.clone()
    corrupted_mask[2, mask[2].sum() - 1] = 0
    with pytest.raises(ValueError, match=r"example 2: the clean prompt has 7 tokens but the corrupted prompt has 6"):
        circuits.engine.patching_values(model, mask, corrupted, corrupted_mask)


def test_empty_batch(model):
    with pytest.raises(ValueError, match="empty batch"):
        circuits.patched_forward(model, torch.zeros(0, 5, dtype=torch.long))


def test_ids_must_be_two_dimensional(model):
    with pytest.raises(ValueError, match=r"\[batch, seq\] tensor, got \(5,\)"):
        circuits.patched_forward(model, torch.zeros(5, dtype=torch.long))


def test_wrong_mask_shape_names_both_shapes(model, batch):
    clean, _, mask = batch
    n_src, n_dst = model.graph.n_src, model.graph.n_dst
    with pytest.raises(ValueError, match=rf"shape \({n_dst}, {n_src}\).*\[{n_src}, {n_dst}\]"):
        circuits.patched_forward(model, clean, mask, torch.ones(n_dst, n_src))


def test_integer_mask_is_rejected(model, batch):
    clean, _, mask = batch
    with pytest.raises(ValueError, match="float tensor.*torch.int64"):
        circuits.patched_forward(model, clean, mask, torch.ones(model.graph.n_src, model.graph.n_dst, dtype=torch.long))


def test_mask_on_another_device_is_rejected(model, batch):
    clean, _, mask = batch
    with pytest.raises(ValueError, match="edge mask is on meta but the model is on cpu"):
        circuits.patched_forward(model, clean, mask, torch.ones(model.graph.n_src, model.graph.n_dst, device="meta"))


def test_ids_on_another_device_are_rejected(model):
    with pytest.raises(ValueError, match="input ids are on meta"):
        circuits.patched_forward(model, torch.zeros(2, 3, dtype=torch.long, device="meta"))


def test_ablation_values_of_another_dtype_are_rejected(model, batch):
    clean, corrupted, mask = batch
    patch = circuits.engine.patching_values(model, mask, corrupted, mask).double()
    with pytest.raises(ValueError, match="dtype torch.float64 but the model runs in torch.float32"):
        circuits.patched_forward(model, clean, mask, torch.ones(model.graph.n_src, model.graph.n_dst), patch)


def test_ablation_values_of_the_wrong_shape_are_rejected(model, batch):
    clean, _, mask = batch
    patch = torch.zeros(model.graph.n_src, 3, 1, 32)
    with pytest.raises(ValueError, match=r"shape \(\d+, 3, 1, 32\)"):
        circuits.patched_forward(model, clean, mask, torch.ones(model.graph.n_src, model.graph.n_dst), patch)


def test_token_outside_the_vocabulary_names_example_and_position(model):
    ids = torch.zeros(2, 4, dtype=torch.long)
    ids[1, 3] = 10_000
    with pytest.raises(ValueError, match="example 1, position 3: token id 10000 is outside the vocabulary"):
        circuits.patched_forward(model, ids)


def test_left_padding_is_rejected_with_the_example(model):
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="example 1: the input attention mask is not right-padded"):
        circuits.patched_forward(model, ids, mask)


def test_mask_shape_differing_from_ids_is_rejected(model):
    with pytest.raises(ValueError, match=r"attention mask has shape \(2, 3\) but the ids have shape \(2, 4\)"):
        circuits.patched_forward(model, torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
