"""The committed induction model: it loads without training, does induction, and every method finds its circuit.

The model and its circuit come from ``scripts/train_induction.py`` (see
results/ground_truth/induction.md). The previous-token head (layer 0) and the induction heads
(layer 1) are read off ``truth.json``: the edges from the one into the others' key inputs.
"""

from __future__ import annotations

import re

import pytest
import torch
from script_loader import load_script

import circuits
import circuits.ground_truth as ground_truth

train_induction = load_script("train_induction")

NAME = "induction-2l"
ACCURACY_BAR = 0.95  # top-1 accuracy on the predictable repeat positions of fresh sequences
TOP_K = 8  # a key edge ranks among the top 8 of every method's 46 edges
ROC_BAR = 0.95


@pytest.fixture(scope="module")
def truth() -> ground_truth.GroundTruth:
    return ground_truth.load(NAME)


@pytest.fixture(scope="module")
def key_edges(truth) -> list[str]:
    """The known circuit's edges from a layer-0 head into a layer-1 key: previous-token head -> induction head."""
    return sorted(edge for edge in truth.edges if re.fullmatch(r"a0\.h\d+->a1\.h\d+<k>", edge))


@pytest.fixture(scope="module")
def small_task(truth) -> circuits.Task:
    return truth.task.subset(16)


def test_it_is_listed_and_loads_without_training(truth):
    assert NAME in ground_truth.available()
    config = truth.model.hf.config
    assert (config.n_layers, config.d_mlp, config.causal) == (2, 0, True)
    assert truth.edges <= set(truth.model.graph.edges)
    assert "training" in truth.info and truth.script.endswith("scripts/train_induction.py")


def test_the_model_does_induction_on_fresh_sequences(truth):
    accuracy, _ = train_induction.in_context_accuracy(truth.model.hf, seed=12345, batches=4)
    assert accuracy > ACCURACY_BAR


def test_the_task_separates_clean_from_corrupted(truth):
    baseline = truth.task.baseline(truth.model)
    assert baseline.accuracy > ACCURACY_BAR
    assert baseline.clean > 5 and baseline.corrupted < 0


def test_the_circuit_is_a_previous_token_head_feeding_induction_heads(truth, key_edges, small_task):
    assert key_edges, "the known circuit has no previous-token -> induction key edge"
    attention = train_induction.task_attention(truth.model.hf, small_task)
    for edge in key_edges:
        previous, induction = (int(h) for h in re.findall(r"h(\d+)", edge))
        assert attention["layer0 previous-token (clean)"][previous] > 0.8, edge
        assert attention["layer1 induction (clean)"][induction] > 0.9, edge
        assert attention["layer1 induction (corrupted)"][induction] < 0.2, edge
        assert {f"input->a1.h{induction}<v>", f"a1.h{induction}->logits"} <= truth.edges
        assert f"input->a0.h{previous}<v>" in truth.edges


@pytest.mark.parametrize("method", ["exact", "eap", "eap-ig-inputs"])
def test_every_attribution_method_ranks_a_key_edge_high(truth, key_edges, small_task, method):
    scores = circuits.attribute(truth.model, small_task, method, progress=False)
    assert set(key_edges) & set(scores.top_edges(TOP_K))
    assert circuits.roc_auc(scores, truth.edges) > ROC_BAR


def test_acdc_recovers_the_known_circuit(truth, small_task):
    circuit = circuits.acdc(truth.model, small_task, threshold=0.1, progress=False)
    assert truth.edges <= set(circuit.edges) and len(circuit.edges) <= len(truth.edges) + 2


def test_the_known_circuit_alone_recovers_most_of_the_effect(truth):
    circuit = circuits.Circuit.from_edges(truth.model.graph, truth.edges)
    assert circuits.evaluate(truth.model, truth.task, circuit).faithfulness > 0.9


def test_the_trainer_samples_sequences_with_a_repeat():
    ids, mask = train_induction.sample_batch(torch.Generator().manual_seed(0), 8)
    assert ids.shape == (8, train_induction.SEQ_LEN) and (ids[:, 0] == train_induction.BOS).all()
    for row, keep in zip(ids, mask, strict=True):
        positions = keep.nonzero().flatten()
        n = train_induction.SEQ_LEN - int(positions[0])  # the repeat fills the last n positions
        first = positions[0] - n  # where the first x_1 sits
        assert len(positions) == n - 1
        assert torch.equal(row[positions[0] : positions[0] + n], row[first : first + n])
