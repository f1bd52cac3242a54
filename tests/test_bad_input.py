"""Bad input fails before the model runs, with one line that names the item (issue 13, items 3, 7 and 8).

API checks raise ``CircuitsError``; the command turns each into one line on stderr and exit status 2,
before the model loads where the input can be judged without it, and before any output folder exists.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import circuits
from circuits import export
from circuits.cli import main
from circuits.errors import CircuitsError
from circuits.testing import VOCAB, tiny_hf, tiny_native, tiny_tokenizer

ROW = {"clean_ids": [5, 6, 7, 5, 6], "corrupted_ids": [9, 6, 7, 5, 6], "answer_ids": 7, "wrong_answer_ids": 9}
CIRCUIT = {
    "cfg": {"n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "parallel_attn_mlp": False},
    "nodes": {"a0.h0": {"in_graph": True}, "logits": {"in_graph": True}},
    "edges": {"a0.h0->logits": {"score": 0.5, "in_graph": True}, "input->a1.h0<q>": {"score": -1.0, "in_graph": False}},
    "meta": {},
}
GPT2_POSITIONS = 64  # the tiny GPT-2's n_positions


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (64 positions, vocabulary 61) with a word-level tokenizer, saved to disk."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_hf("gpt2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return circuits.load_model(str(gpt2_dir), device="cpu")


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model is a failure of the test: the bad input must be found before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("circuits.model.load_model", refuse)


def one_error_line(err: str, command: str) -> str:
    """stderr holds exactly one line, the command's error, and no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"circuits {command}: error: "), lines[0]
    return lines[0]


def write_rows(path, rows) -> str:
    path.write_text("".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return str(path)


def id_task(**changes) -> circuits.Task:
    columns = {key: [value] * 3 for key, value in ROW.items()}
    for key, (i, value) in changes.items():
        columns[key][i] = value
    return circuits.Task.from_token_ids("t", *columns.values())


def discover(model_dir, task_file, out, *extra) -> int:
    return main(["discover", "--model", str(model_dir), "--task-file", str(task_file), "--method", "eap",
                 "--top-n", "5", "--out", str(out), "--quiet", *extra])  # fmt: skip


# --- prompts longer than the model's positions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "limit"),
    [
        (lambda: tiny_hf("gpt2"), ("n_positions", 64)),
        (lambda: tiny_hf("llama"), ("max_position_embeddings", 2048)),
        (lambda: tiny_hf("neox"), ("max_position_embeddings", 2048)),
        (lambda: tiny_native("native-mlp-ln"), ("n_positions", 16)),
        (lambda: tiny_native("native-bidirectional-nopos"), ("n_positions", None)),
    ],
)
def test_each_family_declares_the_config_field_that_bounds_its_positions(model, limit):
    adapter = circuits.Model.from_hf(model()).adapter
    assert (adapter.position_limit, adapter.max_positions) == limit


def test_a_batch_longer_than_gpt2_positions_is_refused_naming_the_example_and_its_length():
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    ids = torch.ones(2, GPT2_POSITIONS + 6, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[0, GPT2_POSITIONS:] = 0
    with pytest.raises(
        CircuitsError, match=r"^example 1: the input prompt is 70 tokens long; .* at most 64 \(n_positions\)"
    ):
        circuits.patched_forward(model, ids, mask)


def test_padding_past_the_position_limit_is_refused():
    model = circuits.Model.from_hf(tiny_hf("gpt2"))
    ids = torch.ones(1, GPT2_POSITIONS + 1, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    with pytest.raises(CircuitsError, match="padded to 65 positions; the model takes at most 64"):
        circuits.patched_forward(model, ids, mask)


def test_a_rotary_model_takes_no_more_than_its_max_position_embeddings():
    hf = tiny_hf("llama")
    hf.config.max_position_embeddings = 8
    model = circuits.Model.from_hf(hf)
    with pytest.raises(
        CircuitsError, match=r"^example 0: the input prompt is 9 tokens long; .*max_position_embeddings"
    ):
        circuits.patched_forward(model, torch.ones(1, 9, dtype=torch.long))


def test_attribute_names_the_task_example_whose_prompts_are_past_the_position_limit(gpt2):
    long = list(range(1, 61)) + [5] * 10
    task = id_task(clean_ids=(2, long), corrupted_ids=(2, [9] + long[1:]))
    with pytest.raises(CircuitsError, match=r"^example 2: the prompts are 70 tokens long; the model takes at most 64"):
        circuits.attribute(gpt2, task, "eap", batch_size=2, progress=False)


def test_cli_task_file_past_the_position_limit_exits_2_naming_its_line_before_any_output(gpt2_dir, tmp_path, capsys):
    long = {**ROW, "clean_ids": [5] * 70, "corrupted_ids": [9] + [5] * 69}
    task_file = write_rows(tmp_path / "long.jsonl", [ROW, "\n", long])
    assert discover(gpt2_dir, task_file, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err, "discover")
    assert "long.jsonl, line 3: the prompts are 70 tokens long; the model takes at most 64 (n_positions)" in line
    assert not (tmp_path / "out").exists()


# --- answer ids outside the vocabulary ----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "label"), [("answer_ids", "answer id"), ("wrong_answer_ids", "wrong answer id")])
def test_an_answer_id_outside_the_vocabulary_is_named_before_the_model_runs(gpt2, key, label):
    task = id_task(**{key: (1, VOCAB)})
    with pytest.raises(
        CircuitsError, match=rf"^example 1: {label} 61 is outside the model's output vocabulary \(0..60\)"
    ):
        circuits.attribute(gpt2, task, "eap", progress=False)


def test_baseline_checks_answer_ids_too(gpt2):
    with pytest.raises(CircuitsError, match="example 0: answer id 1000 is outside"):
        id_task(answer_ids=(0, [7, 1000])).baseline(gpt2)


def test_an_output_id_outside_the_vocabulary_is_named_with_its_position():
    model = circuits.Model.from_hf(tiny_native("native-attn-only"))
    task = circuits.Task.from_outputs("o", [[1, 2, 3]], [[3, 2, 1]], [[4, VOCAB + 5]], positions=[[0, 2]])
    with pytest.raises(CircuitsError, match="example 0, position 2: output id 66 is outside"):
        circuits.attribute(model, task, "exact", progress=False)


def test_cli_wrong_answer_id_outside_the_vocabulary_exits_2_naming_its_line(gpt2_dir, tmp_path, capsys):
    task_file = write_rows(tmp_path / "ids.jsonl", [ROW, ROW, "\n", {**ROW, "wrong_answer_ids": [9, 1000]}])
    assert discover(gpt2_dir, task_file, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err, "discover")
    assert "ids.jsonl, line 4: wrong answer id 1000 is outside the model's output vocabulary (0..60)" in line
    assert not (tmp_path / "out").exists()


def test_ids_too_large_for_int64_are_refused_when_the_task_is_made():
    with pytest.raises(CircuitsError, match="example 1: answer id must be a token id"):
        id_task(answer_ids=(1, 2**63))


# --- truncated weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999], ids=["zero-byte", "half", "last-byte-missing"])
def test_a_truncated_safetensors_file_in_an_hf_folder_is_named(tmp_path, keep):
    tiny_hf("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CircuitsError, match=rf"^{re.escape(str(weights))}: not a complete safetensors file"):
        circuits.load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("keep", [0.0, 0.5], ids=["zero-byte", "half"])
def test_a_truncated_native_weights_file_is_named(tmp_path, keep):
    tiny_native("native-mlp-ln").save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * keep)])
    with pytest.raises(CircuitsError, match=re.escape(str(weights))):
        circuits.native.NativeTransformer.load(tmp_path)


def test_cli_truncated_weights_exit_2_naming_the_file(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_hf("llama").save_pretrained(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"")
    assert (
        main(["discover", "--model", str(model_dir), "--task", "induction", "--out", str(tmp_path / "o"), "--quiet"])
        == 2
    )
    assert "model.safetensors: not a complete safetensors file" in one_error_line(capsys.readouterr().err, "discover")


# --- devices -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "cuda:99", "xpu"])
def test_load_model_refuses_a_device_whose_backend_is_unavailable(gpt2_dir, device):
    with pytest.raises(CircuitsError, match=f"device '{device}' asked for, but"):
        circuits.load_model(str(gpt2_dir), device=device)


def test_load_model_refuses_a_malformed_device(gpt2_dir):
    with pytest.raises(CircuitsError, match="unknown device 'gpu-please'"):
        circuits.load_model(str(gpt2_dir), device="gpu-please")


def test_cli_device_mps_exits_2_before_any_output(gpt2_dir, tmp_path, capsys):
    task_file = write_rows(tmp_path / "t.jsonl", [ROW])
    assert discover(gpt2_dir, task_file, tmp_path / "out", "--device", "mps") == 2
    assert "device 'mps' asked for" in one_error_line(capsys.readouterr().err, "discover")
    assert not (tmp_path / "out").exists()


# --- circuit files ----------------------------------------------------------------------------------------------------


def write_circuit(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_a_circuit_file_with_an_absurd_cfg_is_refused_before_any_graph_is_built(tmp_path, monkeypatch):
    def no_graph(*args, **kwargs):
        raise AssertionError("a graph was built")

    monkeypatch.setattr(export, "Graph", no_graph)
    path = write_circuit(tmp_path / "c.json", {**CIRCUIT, "cfg": {"n_layers": 10**6, "n_heads": 32}})
    with pytest.raises(
        CircuitsError, match=r"n_layers 1000000, n_heads 32, n_kv_heads 32 make a graph of [\d,]+ edges"
    ):
        circuits.Circuit.load(path)


def test_the_edge_count_bound_is_computed_without_building_the_graph():
    for shape in [(1, 1, 1, False), (3, 4, 2, False), (3, 4, 4, True), (5, 6, 3, True)]:
        assert export.edge_count(*shape) == len(circuits.Graph(*shape))


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, []])
def test_an_edge_whose_in_graph_is_not_a_bool_is_named(tmp_path, value):
    data = json.loads(json.dumps(CIRCUIT))
    data["edges"]["input->a1.h0<q>"]["in_graph"] = value
    path = write_circuit(tmp_path / "c.json", data)
    with pytest.raises(CircuitsError, match=r"edge 'input->a1\.h0<q>': in_graph must be true or false"):
        circuits.Circuit.load(path)


@pytest.mark.parametrize("value", [True, False, "0.5", [0.5], float("inf"), float("nan")])
def test_an_edge_whose_score_is_not_a_finite_number_is_named(tmp_path, value):
    data = json.loads(json.dumps(CIRCUIT))
    data["edges"]["a0.h0->logits"]["score"] = value
    path = write_circuit(tmp_path / "c.json", data)
    with pytest.raises(CircuitsError, match=r"edge 'a0\.h0->logits' has a non-(numeric|finite) score"):
        circuits.Circuit.load(path)


def test_a_node_whose_in_graph_is_not_a_bool_is_named(tmp_path):
    data = json.loads(json.dumps(CIRCUIT))
    data["nodes"]["a0.h0"]["in_graph"] = "yes"
    with pytest.raises(CircuitsError, match=r"node 'a0\.h0': in_graph must be true or false, got 'yes'"):
        circuits.Circuit.load(write_circuit(tmp_path / "c.json", data))


@pytest.mark.parametrize(("key", "value"), [("n_layers", "2"), ("n_heads", 2.0), ("n_layers", True), ("n_kv_heads", 0)])
def test_a_cfg_count_that_is_not_a_positive_integer_is_named(tmp_path, key, value):
    data = json.loads(json.dumps(CIRCUIT))
    data["cfg"][key] = value
    with pytest.raises(
        CircuitsError, match=rf"bad 'cfg': {key} must be a positive integer, got {re.escape(repr(value))}"
    ):
        circuits.Circuit.load(write_circuit(tmp_path / "c.json", data))


def test_cli_plot_of_a_circuit_file_with_a_string_in_graph_exits_2_naming_the_edge(tmp_path, capsys):
    data = json.loads(json.dumps(CIRCUIT))
    data["edges"]["a0.h0->logits"]["in_graph"] = "false"
    path = write_circuit(tmp_path / "c.json", data)
    assert main(["plot", path, "-o", str(tmp_path / "c.png")]) == 2
    assert "edge 'a0.h0->logits': in_graph must be true or false" in one_error_line(capsys.readouterr().err, "plot")


# --- the command's files and folders -------------------------------------------------------------------------------


def test_a_folder_given_as_task_file_exits_2_saying_it_is_a_folder(tmp_path, capsys, no_model_load):
    assert discover("some-model", tmp_path, tmp_path / "out") == 2
    assert f"task file {tmp_path} is a folder" in one_error_line(capsys.readouterr().err, "discover")


def test_discover_out_below_a_file_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "file").write_text("")
    task_file = write_rows(tmp_path / "t.jsonl", [ROW])
    assert discover("some-model", task_file, tmp_path / "file" / "out") == 2
    assert "cannot create the output folder" in one_error_line(capsys.readouterr().err, "discover")


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_discover_out_in_a_folder_where_no_file_can_be_created_exits_2_before_the_model_loads(
    tmp_path, capsys, no_model_load
):
    task_file = write_rows(tmp_path / "t.jsonl", [ROW])
    assert discover("some-model", task_file, "/proc/self") == 2
    assert "cannot write to the output folder /proc/self" in one_error_line(capsys.readouterr().err, "discover")


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_evaluate_out_in_a_folder_where_no_file_can_be_created_exits_2_before_the_model_loads(
    tmp_path, capsys, no_model_load
):
    circuit = write_circuit(tmp_path / "c.json", {**CIRCUIT, "meta": {"model": "some-model"}})
    task_file = write_rows(tmp_path / "t.jsonl", [ROW])
    assert main(["evaluate", circuit, "--task-file", task_file, "--out", "/proc/self/x", "--quiet"]) == 2
    assert "cannot write to the --out folder /proc/self/x" in one_error_line(capsys.readouterr().err, "evaluate")


# --- messages that help ---------------------------------------------------------------------------------------------


def test_the_length_mismatch_message_is_one_line_showing_both_prompts_tokens():
    task = circuits.Task("t", ["the cat sat"], ["the cat sat on"], [" mat"], [" dog"])
    with pytest.raises(CircuitsError) as error:
        task.tokenize(tiny_tokenizer())
    (line,) = str(error.value).splitlines()
    assert "(3 vs 4 tokens)" in line
    assert (
        "'the cat sat' -> ['the', 'cat', 'sat']" in line and "'the cat sat on' -> ['the', 'cat', 'sat', 'on']" in line
    )


def test_cli_length_mismatch_shows_both_prompts_tokens(gpt2_dir, tmp_path, capsys):
    row = {"clean": "the cat sat", "corrupted": "a dog sat on", "answers": "mat", "wrong_answers": "park"}
    task_file = write_rows(tmp_path / "text.jsonl", [row])
    assert discover(gpt2_dir, task_file, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err, "discover")
    assert "text.jsonl, line 1: the clean and corrupted prompts tokenize to different lengths (3 vs 4 tokens)" in line
    assert "['the', 'cat', 'sat']" in line and "['a', 'dog', 'sat', 'on']" in line


def test_task_file_errors_name_the_line_counting_blank_lines(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [ROW, "\n", "\n", {**ROW, "answer_ids": -3}])
    with pytest.raises(CircuitsError, match=r"t\.jsonl, line 4: answer id must be a token id"):
        circuits.Task.from_jsonl(path)


def test_a_subset_of_a_task_file_keeps_naming_lines(tmp_path, gpt2):
    path = write_rows(tmp_path / "t.jsonl", ["\n", ROW, {**ROW, "answer_ids": 99}, ROW])
    task = circuits.Task.from_jsonl(path).subset(2)
    with pytest.raises(CircuitsError, match=r"t\.jsonl, line 3: answer id 99 is outside"):
        task.check(gpt2)


def test_non_utf8_task_file_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + json.dumps(ROW).encode().replace(b"5", b"\xff", 1) + b"\n")
    with pytest.raises(CircuitsError, match=r"t\.jsonl, line 2: not UTF-8 text"):
        circuits.Task.from_jsonl(path)


def test_a_relative_model_path_is_stored_resolved_so_evaluate_finds_it_from_another_folder(
    gpt2_dir, tmp_path, monkeypatch
):
    task_file = write_rows(tmp_path / "t.jsonl", [ROW, {**ROW, "clean_ids": [5, 6, 8, 5, 6]}])
    monkeypatch.chdir(gpt2_dir.parent)
    assert discover(gpt2_dir.name, task_file, tmp_path / "run") == 0
    assert json.loads((tmp_path / "run" / "circuit.json").read_text())["meta"]["model"] == str(gpt2_dir.resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "run/circuit.json", "--task-file", task_file, "--quiet"]) == 0


def test_evaluate_says_to_pass_model_when_the_stored_model_path_is_gone(tmp_path, capsys):
    circuit = write_circuit(tmp_path / "c.json", {**CIRCUIT, "meta": {"model": str(tmp_path / "gone")}})
    task_file = write_rows(tmp_path / "t.jsonl", [ROW])
    assert main(["evaluate", circuit, "--task-file", task_file, "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert f"{circuit} names model '{tmp_path / 'gone'}', which cannot be loaded; pass --model" in line


@pytest.mark.parametrize(
    "metric",
    [
        lambda logits, batch: logits[:, 0].detach(),
        lambda logits, batch: torch.tensor([row[0].item() for row in logits]),
    ],
    ids=["detach", "torch.tensor"],
)
def test_a_detached_custom_metric_is_named_when_gradients_are_needed(gpt2, metric):
    metric.__name__ = "my_metric"
    task = circuits.Task.from_token_ids("t", [[5, 6, 7]], [[9, 6, 7]], [7], [9], metric=metric)
    with pytest.raises(CircuitsError, match="metric 'my_metric' returned a tensor detached from the logits"):
        circuits.attribute(gpt2, task, "eap", progress=False)


def test_a_detached_custom_metric_is_fine_where_no_gradient_is_taken(gpt2):
    def detached(logits, batch):
        return logits[:, 0].detach()

    task = circuits.Task.from_token_ids("t", [[5, 6, 7]], [[9, 6, 7]], [7], [9], metric=detached)
    scores = circuits.attribute(gpt2, task, "exact", progress=False)
    assert torch.isfinite(scores.values()).all()


# --- properties: any malformed file, one line and exit status 2 --------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=6))
JSON = st.recursive(
    JSON_SCALARS | st.integers(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
NOT_AN_ID = st.one_of(JSON_SCALARS, st.dictionaries(st.text(max_size=3), JSON, max_size=2), st.just([]), st.just([[1]]))
NOT_ID_LISTS = st.one_of(
    NOT_AN_ID, st.integers(), st.lists(st.one_of(JSON_SCALARS, st.lists(st.integers(), max_size=2)), min_size=1)
)
BAD_ID = st.one_of(st.integers(min_value=VOCAB, max_value=2**80), st.integers(min_value=-(2**80), max_value=-1))


@st.composite
def bad_row(draw) -> bytes:
    """One example line that is wrong in one way; every other line of its file is valid."""
    row = json.loads(json.dumps(ROW))
    how = draw(st.sampled_from(["type", "missing", "ragged", "id", "long", "not-object", "not-json", "not-utf8"]))
    if how == "type":
        key = draw(st.sampled_from(list(ROW)))
        row[key] = draw(NOT_ID_LISTS if key.endswith("clean_ids") or key == "corrupted_ids" else NOT_AN_ID)
    elif how == "missing":
        for key in draw(st.sets(st.sampled_from(list(ROW)), min_size=1)):
            del row[key]
    elif how == "ragged":
        row["clean_ids"] = draw(
            st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=9).filter(lambda ids: len(ids) != 5)
        )
    elif how == "id":
        key = draw(st.sampled_from(list(ROW)))
        if isinstance(row[key], list):
            row[key][draw(st.integers(0, len(row[key]) - 1))] = draw(BAD_ID)
        else:
            row[key] = draw(BAD_ID)
    elif how == "long":
        length = draw(st.integers(GPT2_POSITIONS + 1, 3 * GPT2_POSITIONS))
        row["clean_ids"], row["corrupted_ids"] = [5] * length, [9] + [5] * (length - 1)
    elif how == "not-object":
        return json.dumps(draw(st.one_of(JSON_SCALARS, st.integers(), st.lists(JSON)))).encode()
    elif how == "not-json":
        return draw(
            st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and not t.startswith(("{", "[")))
        ).encode()
    text = json.dumps(row).encode()
    if how == "not-utf8":
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82"])) + text[cut:]
    return text


@st.composite
def bad_task_file(draw) -> tuple[bytes, int | None]:
    """A task file and the line of its one bad example (None: the whole file is noise)."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=120)), None
    before = draw(st.lists(st.sampled_from([json.dumps(ROW).encode(), b""]), max_size=3))
    after = draw(st.lists(st.sampled_from([json.dumps(ROW).encode(), b""]), max_size=2))
    return b"\n".join([*before, draw(bad_row()), *after]) + b"\n", len(before) + 1


@pytest.fixture
def gpt2_loads_once(gpt2, monkeypatch):
    """`circuits discover --model` gets the tiny GPT-2 loaded by the module's fixture, without reading it again."""
    monkeypatch.setattr("circuits.model.load_model", lambda *args, **kwargs: gpt2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_task_file())
def test_any_malformed_task_file_exits_2_with_one_line_before_any_output(
    case, gpt2_dir, tmp_path, capsys, gpt2_loads_once
):
    content, line = case
    task_file, out = tmp_path / "task.jsonl", tmp_path / "out"
    task_file.write_bytes(content)
    assert discover(gpt2_dir, task_file, out) == 2
    message = one_error_line(capsys.readouterr().err, "discover")
    assert str(task_file) in message
    if line is not None:
        assert re.search(rf"task\.jsonl, line {line}\b", message), message
    assert not out.exists()


BAD_COUNTS = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=10**5, max_value=10**18),
    st.floats(),
    st.text(max_size=4),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def bad_circuit_file(draw) -> bytes:
    """A circuit file that is wrong in one way."""
    data = json.loads(json.dumps(CIRCUIT))
    text = json.dumps(CIRCUIT).encode()
    how = draw(
        st.sampled_from(
            ["structure", "count", "parallel", "cfg", "edges", "entry", "in_graph", "score", "edge", "nodes", "meta",
             "cut", "bytes"]
        )
    )  # fmt: skip
    if how == "structure":  # anything without 'cfg' and 'edges' objects
        data = draw(JSON.filter(lambda v: not (isinstance(v, dict) and "cfg" in v and "edges" in v)))
    elif how == "count":
        data["cfg"][draw(st.sampled_from(["n_layers", "n_heads", "n_kv_heads"]))] = draw(BAD_COUNTS)
    elif how == "parallel":
        data["cfg"]["parallel_attn_mlp"] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
    elif how == "cfg":
        data["cfg"] = draw(st.one_of(JSON_SCALARS, st.integers(), st.lists(JSON, max_size=2)))
    elif how == "edges":
        data["edges"] = draw(st.one_of(JSON_SCALARS, st.integers(), st.lists(JSON, max_size=2)))
    elif how == "entry":
        data["edges"]["a0.h0->logits"] = draw(st.one_of(JSON_SCALARS, st.integers(), st.lists(JSON, max_size=2)))
    elif how == "in_graph":
        data["edges"]["a0.h0->logits"]["in_graph"] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
    elif how == "score":
        bad = st.one_of(
            st.booleans(),
            st.text(max_size=5),
            st.lists(st.floats(), max_size=2),
            st.sampled_from([float("nan"), float("inf")]),
        )
        data["edges"]["input->a1.h0<q>"]["score"] = draw(bad)
    elif how == "edge":
        data["edges"][draw(st.text(max_size=12).filter(lambda name: name not in circuits.Graph(2, 2).edges))] = {
            "score": 1.0,
            "in_graph": True,
        }
    elif how == "nodes":
        data["nodes"] = draw(
            st.one_of(
                JSON_SCALARS,
                st.lists(JSON, max_size=2),
                st.fixed_dictionaries(
                    {"a0.h0": st.one_of(JSON_SCALARS, st.fixed_dictionaries({"in_graph": st.integers()}))}
                ),
                st.dictionaries(
                    st.text(max_size=6).filter(lambda n: n not in circuits.Graph(2, 2).sources + ["logits"]),
                    st.just({}),
                    min_size=1,
                    max_size=2,
                ),
            )
        )
    elif how == "meta":
        data["meta"] = draw(st.one_of(JSON_SCALARS, st.integers(), st.lists(JSON, max_size=2)))
    elif how == "cut":
        return text[: draw(st.integers(0, len(text) - 1))]
    else:
        return draw(st.binary(max_size=80)) + b"\xff"
    return json.dumps(data).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=bad_circuit_file())
def test_any_malformed_circuit_file_exits_2_with_one_line(content, tmp_path, capsys):
    circuit, figure = tmp_path / "circuit.json", tmp_path / "figure.png"
    circuit.write_bytes(content)
    assert main(["plot", str(circuit), "-o", str(figure)]) == 2
    assert str(circuit) in one_error_line(capsys.readouterr().err, "plot")
    assert not figure.exists()


@pytest.mark.parametrize(
    ("name", "content", "command"),
    [
        ("c.json", json.dumps({**CIRCUIT, "cfg": {"n_layers": "2", "n_heads": 2}}).encode(), "plot"),
        ("c.json", json.dumps(CIRCUIT).encode()[:40], "plot"),
        ("t.jsonl", json.dumps(ROW).encode() + b"\n\xff\n", "discover"),
    ],
    ids=["string-count", "cut", "non-utf8-task"],
)
def test_the_installed_command_exits_2_with_one_line_for_a_malformed_file(tmp_path, name, content, command):
    path = tmp_path / name
    path.write_bytes(content)
    if command == "plot":
        argv = ["plot", str(path), "-o", str(tmp_path / "f.png")]
    else:
        argv = [
            "discover",
            "--model",
            str(tmp_path / "no-model"),
            "--task-file",
            str(path),
            "--out",
            str(tmp_path / "o"),
        ]
    result = subprocess.run([sys.executable, "-m", "circuits", *argv], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert str(path) in one_error_line(result.stderr, command)
