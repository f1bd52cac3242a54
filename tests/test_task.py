"""The Task API: construction, tokenization, validation, metrics, subsets, files and baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import circuits
from circuits.task import correct, metric_values
from circuits.testing import tiny_hf, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def text_task(**overrides):
    fields = dict(
        name="toy",
        clean=["the cat sat on the", "a dog ran to the", "the cat ran to a"],
        corrupted=["the dog sat on the", "a cat ran to the", "the dog ran to a"],
        answers=["mat", ["park", "mat"], "park"],
        wrong_answers=["park", "cat", ["dog", "cat"]],
    )
    return circuits.Task(**{**fields, **overrides})


def id_task(metric="logit_diff"):
    return circuits.Task.from_token_ids(
        "ids",
        clean_ids=[[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]],
        corrupted_ids=[[1, 2, 9, 4], [5, 8, 7], [8, 9, 13, 11, 12]],
        answer_ids=[20, [21, 22], 23],
        wrong_answer_ids=[30, 31, [32, 33]],
        metric=metric,
    )


# --- tokenization ------------------------------------------------------------------------


def test_tokenize_right_pads_and_finds_prediction_positions(tokenizer):
    tokenized = text_task(
        clean=["the cat sat on the", "a dog", "the cat ran to a"],
        corrupted=["the dog sat on the", "a cat", "the dog ran to a"],
    ).tokenize(tokenizer)
    assert tokenized.clean_ids.shape == (3, 5)
    assert tokenized.attention_mask.tolist()[1] == [1, 1, 0, 0, 0]
    assert tokenized.positions.tolist() == [4, 1, 4]


def test_answer_sets_are_padded_with_a_mask(tokenizer):
    tokenized = text_task().tokenize(tokenizer)
    assert tokenized.answer_ids[1].tolist() == [10, 5]
    assert tokenized.answer_mask.tolist() == [[True, False], [True, True], [True, False]]


def test_tokenize_is_cached_per_tokenizer(tokenizer):
    task = text_task()
    assert task.tokenize(tokenizer) is task.tokenize(tokenizer)
    assert task.tokenize(tiny_tokenizer()) is not task.tokenize(tokenizer)


def test_token_id_task_needs_no_tokenizer():
    tokenized = id_task().tokenize()
    assert tokenized.clean_ids[1].tolist() == [5, 6, 7, 0, 0]
    assert tokenized.positions.tolist() == [3, 2, 4]


def test_text_task_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="holds text: tokenize it with the model's tokenizer"):
        text_task().tokenize(None)


def test_batches_are_trimmed_to_their_longest_prompt():
    first, second = list(id_task().tokenize().batches(2))
    assert first.clean_ids.shape == (2, 4) and second.clean_ids.shape == (1, 5)
    assert second.start == 2


# --- validation ---------------------------------------------------------------------------


def test_pair_of_different_token_lengths_shows_both_tokenizations(tokenizer):
    task = text_task(corrupted=["the dog sat on the", "a cat ran to the park", "the dog ran to a"])
    with pytest.raises(ValueError) as error:
        task.tokenize(tokenizer)
    message = str(error.value)
    assert "example 1: the clean and corrupted prompts tokenize to different lengths (5 vs 6 tokens)" in message
    assert "'a dog ran to the' -> ['a', 'dog', 'ran', 'to', 'the']" in message
    assert "'a cat ran to the park' -> ['a', 'cat', 'ran', 'to', 'the', 'park']" in message


def test_answer_of_several_tokens_names_the_example_and_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"example 2: answer 'the park' is 2 tokens \['the', 'park'\]"):
        text_task(answers=["mat", "park", "the park"]).tokenize(tokenizer)


def test_wrong_answer_in_a_set_is_checked_too(tokenizer):
    with pytest.raises(ValueError, match=r"example 0: wrong answer 'a dog' is 2 tokens"):
        text_task(wrong_answers=[["park", "a dog"], "cat", "dog"]).tokenize(tokenizer)


def test_empty_task_is_an_error():
    with pytest.raises(ValueError, match="task 'toy' is empty"):
        text_task(clean=[], corrupted=[], answers=[], wrong_answers=[])


def test_lists_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="clean has 3 entries but answers has 2"):
        text_task(answers=["mat", "park"])


def test_unknown_metric_name_is_an_error():
    with pytest.raises(ValueError, match="unknown metric 'accuracy'; choose one of logit_diff, prob_diff, kl"):
        text_task(metric="accuracy")


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="example 1: the corrupted prompt must be a non-empty string"):
        text_task(corrupted=["the dog sat on the", "", "the dog ran to a"])


def test_token_id_pair_of_different_lengths_is_an_error():
    with pytest.raises(ValueError, match="example 0: the clean prompt has 2 tokens but the corrupted prompt has 3"):
        circuits.Task.from_token_ids("ids", [[1, 2]], [[1, 2, 3]], [4], [5])


def test_custom_metric_returning_nan_names_the_example():
    task = id_task(metric=lambda logits, batch: torch.where(batch.positions == 2, float("nan"), 1.0))
    tokenized = task.tokenize()
    with pytest.raises(ValueError, match="returned nan for example 1"):
        metric_values(task.metric, torch.zeros(3, 40), tokenized)


def test_custom_metric_of_the_wrong_shape_is_an_error():
    def per_token(logits, batch):
        return logits[:, :2]

    with pytest.raises(ValueError, match=r"'per_token' returned shape \(3, 2\); it must return one value per example"):
        metric_values(per_token, torch.zeros(3, 40), id_task().tokenize())


# --- metrics --------------------------------------------------------------------------------


def test_logit_diff_with_sets_is_mean_answer_minus_mean_wrong():
    tokenized = id_task().tokenize()
    logits = torch.randn(3, 40)
    values = metric_values("logit_diff", logits, tokenized)
    assert values[0] == pytest.approx(float(logits[0, 20] - logits[0, 30]))
    assert values[1] == pytest.approx(float((logits[1, 21] + logits[1, 22]) / 2 - logits[1, 31]))
    assert values[2] == pytest.approx(float(logits[2, 23] - (logits[2, 32] + logits[2, 33]) / 2))


def test_prob_diff_with_sets_is_summed_probability_difference():
    tokenized = id_task().tokenize()
    logits = torch.randn(3, 40)
    probs = logits.softmax(-1)
    values = metric_values("prob_diff", logits, tokenized)
    assert values[1] == pytest.approx(float(probs[1, 21] + probs[1, 22] - probs[1, 31]), abs=1e-6)


def test_kl_is_clean_against_patched():
    tokenized = id_task().tokenize()
    clean, patched = torch.randn(3, 40), torch.randn(3, 40)
    expected = F.kl_div(F.log_softmax(patched, -1), F.log_softmax(clean, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(metric_values("kl", patched, tokenized, clean), expected, atol=1e-6)
    assert torch.allclose(metric_values("kl", clean, tokenized, clean), torch.zeros(3), atol=1e-6)


def test_correct_compares_best_answer_with_best_wrong_answer():
    tokenized = id_task().tokenize()
    logits = torch.zeros(3, 40)
    logits[0, 20] = 1  # answer wins
    logits[1, 31] = 1  # wrong wins
    logits[2, 23], logits[2, 33] = 2, 1  # answer beats the best of the wrong set
    assert correct(logits, tokenized).tolist() == [True, False, True]


# --- subsets and files ---------------------------------------------------------------------------


def test_split_is_disjoint_complete_and_seeded():
    task = circuits.Task.from_token_ids(
        "ids", [[i, i + 1] for i in range(10)], [[i, 0] for i in range(10)], [1] * 10, [2] * 10
    )
    discovery, test = task.split(0.3, seed=4)
    assert (len(discovery), len(test)) == (7, 3)
    firsts = sorted(row[0] for part in (discovery, test) for row in part.token_ids["clean_ids"])
    assert firsts == list(range(10))
    assert test.token_ids == task.split(0.3, seed=4)[1].token_ids
    assert test.token_ids != task.split(0.3, seed=5)[1].token_ids


def test_subset_takes_the_first_examples():
    sub = text_task().subset(2)
    assert sub.clean == text_task().clean[:2] and len(sub) == 2
    with pytest.raises(ValueError, match="between 1 and 3"):
        text_task().subset(4)


def test_jsonl_round_trip_is_lossless(tmp_path):
    for task in (text_task(), id_task()):
        path = task.to_jsonl(tmp_path / f"{task.name}.jsonl")
        back = circuits.Task.from_jsonl(path, name=task.name)
        if task.token_ids:
            assert back.token_ids == task.token_ids
        else:
            assert (back.clean, back.corrupted, back.answers, back.wrong_answers) == (
                task.clean,
                task.corrupted,
                task.answers,
                task.wrong_answers,
            )


def test_jsonl_accepts_autocircuit_keys(tmp_path):
    path = tmp_path / "capitals.jsonl"
    path.write_text(json.dumps({"clean": "a", "corrupt": "b", "answers": [" x"], "wrong_answers": [" y"]}) + "\n")
    task = circuits.Task.from_jsonl(path)
    assert task.name == "capitals" and task.corrupted == ["b"] and task.answers == [[" x"]]


def test_jsonl_malformed_line_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"clean": "a", "corrupted": "b", "answers": "x", "wrong_answers": "y"}\n{"clean": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        circuits.Task.from_jsonl(path)


def test_jsonl_missing_key_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"clean": "a", "corrupted": "b", "answers": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1: missing 'wrong_answers'"):
        circuits.Task.from_jsonl(path)


def test_jsonl_write_keeps_the_old_file_if_it_fails(tmp_path):
    path = text_task().to_jsonl(tmp_path / "task.jsonl")
    before = path.read_text()
    task = text_task()
    task.clean[0] = object()  # not JSON-serialisable: the write fails half-way
    with pytest.raises(TypeError):
        task.to_jsonl(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["task.jsonl"]


# --- baselines -----------------------------------------------------------------------------------


def test_baseline_matches_a_direct_computation():
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    task = id_task()
    baseline = task.baseline(model, batch_size=2)
    tokenized = task.tokenize()
    with torch.no_grad():
        clean = model.hf(tokenized.clean_ids, attention_mask=tokenized.attention_mask).logits
        corrupted = model.hf(tokenized.corrupted_ids, attention_mask=tokenized.attention_mask).logits
    rows = torch.arange(3)
    clean, corrupted = clean[rows, tokenized.positions], corrupted[rows, tokenized.positions]
    assert baseline.clean == pytest.approx(float(metric_values("logit_diff", clean, tokenized).mean()), abs=1e-5)
    assert baseline.corrupted == pytest.approx(
        float(metric_values("logit_diff", corrupted, tokenized).mean()), abs=1e-5
    )
    assert baseline.accuracy == pytest.approx(float(correct(clean, tokenized).float().mean()))
    assert list(baseline.per_example.columns) == ["clean", "corrupted", "correct"] and len(baseline.per_example) == 3


def test_kl_baseline_is_zero_on_clean():
    baseline = id_task(metric="kl").baseline(circuits.Model.from_hf(tiny_hf("llama")))
    assert baseline.clean == pytest.approx(0, abs=1e-6) and baseline.corrupted > 0


# --- property-based: malformed input raises ValueError and nothing else --------------------------

anything = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 100) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None)
@given(clean=anything, corrupted=anything, answers=anything, wrong=anything, metric=anything)
def test_malformed_text_tasks_raise_value_error(clean, corrupted, answers, wrong, metric):
    try:
        task = circuits.Task("fuzz", clean, corrupted, answers, wrong, metric=metric)
    except ValueError:
        return
    task.tokenize(tiny_tokenizer())  # whatever got through must tokenize or raise ValueError
    assert len(task) > 0


@settings(max_examples=150, deadline=None)
@given(clean=anything, corrupted=anything, answers=anything, wrong=anything)
def test_malformed_token_id_tasks_raise_value_error(clean, corrupted, answers, wrong):
    try:
        task = circuits.Task.from_token_ids("fuzz", clean, corrupted, answers, wrong)
    except ValueError:
        return
    assert task.tokenize().clean_ids.shape[0] == len(task)


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.text(max_size=40) | st.builds(json.dumps, anything), min_size=0, max_size=4))
def test_malformed_jsonl_raises_value_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "task.jsonl"
    path.write_text("\n".join(lines))
    try:
        task = circuits.Task.from_jsonl(path)
    except ValueError:
        return
    assert len(task) > 0


# --- inputs as users hold them: tensors, numpy arrays, numpy integers -------------------------

ROWS = [[1, 2, 3], [4, 5, 6]]
CORRUPTED_ROWS = [[1, 9, 3], [4, 5, 8]]


def same_task(a, b):
    """Two tasks hold the same data: equal plain-Python ``to_dict()`` and equal ``tokenize()`` tensors."""
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    for field, value in vars(a.tokenize()).items():
        other = getattr(b.tokenize(), field)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, field


def test_from_token_ids_accepts_torch_tensors_and_gives_the_same_task_as_lists():
    lists = circuits.Task.from_token_ids("ids", ROWS, CORRUPTED_ROWS, [20, 21], [[30, 31], [32, 33]])
    tensors = circuits.Task.from_token_ids(
        "ids",
        torch.tensor(ROWS),
        torch.tensor(CORRUPTED_ROWS),
        torch.tensor([20, 21]),
        torch.tensor([[30, 31], [32, 33]]),
    )
    same_task(tensors, lists)


def test_from_token_ids_accepts_numpy_arrays_and_numpy_integers():
    lists = circuits.Task.from_token_ids("ids", ROWS, CORRUPTED_ROWS, [20, 21], [30, 31])
    arrays = circuits.Task.from_token_ids(
        "ids",
        np.array(ROWS),
        np.array(CORRUPTED_ROWS, dtype=np.int32),
        np.array([20, 21]),
        [np.int64(30), np.int64(31)],
    )
    same_task(arrays, lists)
    scalars = circuits.Task.from_token_ids("ids", list(np.array(ROWS)), CORRUPTED_ROWS, [20, 21], [30, 31])
    same_task(scalars, lists)  # rows of np.int64 (a numpy row turned into a list)


def test_from_token_ids_accepts_a_list_of_one_dimensional_tensors_of_different_lengths():
    clean = [[1, 2, 3, 4], [5, 6]]
    corrupted = [[1, 2, 9, 4], [5, 8]]
    lists = circuits.Task.from_token_ids("ids", clean, corrupted, [[20, 21], 22], [30, 31])
    tensors = circuits.Task.from_token_ids(
        "ids",
        [torch.tensor(row) for row in clean],
        [np.array(row) for row in corrupted],
        [torch.tensor([20, 21]), torch.tensor(22)],
        [np.int64(30), 31],
    )
    same_task(tensors, lists)


def test_token_id_task_from_tensors_writes_plain_json(tmp_path):
    task = circuits.Task.from_token_ids(
        "ids", torch.tensor(ROWS), np.array(CORRUPTED_ROWS), np.array([20, 21]), [30, 31]
    )
    data = task.to_dict()
    assert all(type(t) is int for row in data["clean_ids"] + data["corrupted_ids"] for t in row)
    assert all(type(a) is int for a in data["answer_ids"])
    path = task.to_jsonl(tmp_path / "task.jsonl")
    same_task(circuits.Task.from_jsonl(path, name="ids"), task)


def test_float_array_of_token_ids_is_an_error_naming_the_dtype():
    with pytest.raises(circuits.errors.CircuitsError, match=r"clean_ids must hold integer ids.*float64"):
        circuits.Task.from_token_ids("ids", np.array(ROWS, dtype=float), CORRUPTED_ROWS, [20, 21], [30, 31])


def test_three_dimensional_tensor_of_token_ids_is_an_error_naming_the_shape():
    with pytest.raises(
        circuits.errors.CircuitsError, match=r"clean_ids must be 2-D, got a 3-D Tensor of shape \(2, 1, 3\)"
    ):
        circuits.Task.from_token_ids("ids", torch.tensor([ROWS]).transpose(0, 1), CORRUPTED_ROWS, [20, 21], [30, 31])


def test_bool_tensor_of_answer_ids_is_an_error():
    with pytest.raises(circuits.errors.CircuitsError, match=r"answer_ids must hold integer ids.*torch.bool"):
        circuits.Task.from_token_ids("ids", ROWS, CORRUPTED_ROWS, torch.tensor([True, False]), [30, 31])


def test_bad_row_in_a_list_of_arrays_names_the_example():
    with pytest.raises(circuits.errors.CircuitsError, match=r"example 1: corrupted_ids must hold integer ids"):
        circuits.Task.from_token_ids("ids", ROWS, [np.array([1, 9, 3]), np.array([4.0, 5, 8])], [20, 21], [30, 31])
    with pytest.raises(circuits.errors.CircuitsError, match=r"example 1: clean_ids must be 1-D, got a 2-D"):
        circuits.Task.from_token_ids(
            "ids", [torch.tensor(ROWS[0]), torch.tensor([ROWS[1]])], CORRUPTED_ROWS, [20, 21], [30, 31]
        )


def test_negative_id_in_a_tensor_names_the_example():
    with pytest.raises(
        circuits.errors.CircuitsError, match=r"example 1: clean_ids must be a non-empty list of token ids"
    ):
        circuits.Task.from_token_ids("ids", torch.tensor([[1, 2, 3], [4, -5, 6]]), CORRUPTED_ROWS, [20, 21], [30, 31])


def test_tensor_pair_of_different_lengths_names_the_example():
    with pytest.raises(circuits.errors.CircuitsError, match=r"example 0: the clean prompt has 3 tokens"):
        circuits.Task.from_token_ids("ids", torch.tensor(ROWS), torch.tensor([[1, 2], [4, 5]]), [20, 21], [30, 31])


def test_from_outputs_accepts_tensors_and_numpy_arrays_and_gives_the_same_task_as_lists():
    outputs, positions = [[0, 1], [1, 2]], [[1, 2], [0, 2]]
    lists = circuits.Task.from_outputs("out", ROWS, CORRUPTED_ROWS, outputs, positions)
    arrays = circuits.Task.from_outputs(
        "out", torch.tensor(ROWS), np.array(CORRUPTED_ROWS), torch.tensor(outputs), np.array(positions)
    )
    same_task(arrays, lists)
    all_positions = circuits.Task.from_outputs("out", ROWS, CORRUPTED_ROWS, [[0, 1, 2], [1, 2, 0]])
    same_task(
        circuits.Task.from_outputs("out", np.array(ROWS), CORRUPTED_ROWS, np.array([[0, 1, 2], [1, 2, 0]])),
        all_positions,
    )


def test_from_outputs_accepts_float_arrays_of_numeric_outputs():
    values = [[0.5, 1.0, -2.0], [1.5, 0.0, 3.0]]
    lists = circuits.Task.from_outputs("out", ROWS, CORRUPTED_ROWS, values, numeric=True)
    arrays = circuits.Task.from_outputs("out", ROWS, CORRUPTED_ROWS, np.array(values), numeric=True)
    same_task(arrays, lists)
    assert all(type(v) is float for row in arrays.to_dict()["outputs"] for v in row)


def test_from_outputs_float_array_of_output_ids_is_an_error():
    with pytest.raises(circuits.errors.CircuitsError, match=r"outputs must hold integer ids.*float"):
        circuits.Task.from_outputs("out", ROWS, CORRUPTED_ROWS, np.array([[0.5, 1, 2], [1, 2, 0]]))
