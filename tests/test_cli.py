"""The `circuits` command end to end on a tiny model saved to disk (no tokenizer: tasks are token ids)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import circuits
from circuits import tasks
from circuits.cli import main
from circuits.pipeline import FILES, select_circuit
from circuits.testing import tiny_hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def discovered(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "induction"
    status = main(
        ["discover", "--model", str(model_dir), "--task", "induction", "--n", "8", "--method", "eap",
         "--compare", "eap-ig-inputs", "--top-n", "20", "--ig-steps", "2", "--out", str(out), "--quiet"]
    )  # fmt: skip
    return status, out


def error_lines(err: str) -> list[str]:
    """What the command printed as errors: exactly one line is wanted, and never a traceback."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def id_task_file(path, rows: int = 6) -> str:
    lines = [
        json.dumps({"clean_ids": [5, 6, 7, 5, 6], "corrupted_ids": [9, 6, 7, 5, 6], "answer_ids": 7,
                    "wrong_answer_ids": 9})
        for _ in range(rows)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_discover_exits_zero_and_writes_every_output_file(discovered):
    status, out = discovered
    assert status == 0
    for name in FILES:
        assert (out / name).stat().st_size > 0, name


def test_discover_summary_records_settings_sizes_metrics_and_timings(discovered):
    _, out = discovered
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"], summary["method"], summary["ablation"], summary["n"]) == (
        "induction",
        "eap",
        "patching",
        8,
    )
    assert 0 < summary["circuit"]["edges"] <= 20
    assert set(summary["curves"]) == {"eap", "eap-ig-inputs"}
    assert all(seconds >= 0 for seconds in summary["seconds"].values())
    assert "torch" in summary["versions"]
    assert summary["evaluation"]["metric_full"] != summary["evaluation"]["metric_empty"]


def test_discover_scores_csv_holds_every_edge(discovered, model_dir):
    _, out = discovered
    rows = (out / "scores.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(circuits.load_model(str(model_dir), device="cpu").graph)


def test_discovered_circuit_file_lists_only_the_circuits_own_edges_and_nodes(discovered):
    _, out = discovered
    data = json.loads((out / "circuit.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len(data["edges"]) == summary["circuit"]["edges"]
    assert all(entry["in_graph"] and entry["score"] is not None for entry in data["edges"].values())
    assert len(data["nodes"]) == summary["circuit"]["nodes"]


def test_discover_with_full_json_lists_every_edge_in_the_eap_ig_layout(model_dir, tmp_path):
    out = tmp_path / "full"
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "4", "--method", "eap",
                   "--top-n", "10", "--full-json", "--out", str(out), "--quiet"])  # fmt: skip
    assert status == 0
    data = json.loads((out / "circuit.json").read_text())
    graph = circuits.load_model(str(model_dir), device="cpu").graph
    assert set(data["edges"]) == set(graph.edges) and len(data["nodes"]) == graph.n_src + 1
    assert (
        sum(entry["in_graph"] for entry in data["edges"].values())
        == json.loads((out / "summary.json").read_text())["circuit"]["edges"]
    )


def test_evaluate_without_every_score_draws_no_curve(discovered, tmp_path, capsys):
    _, out = discovered
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "circuit.json").write_text((out / "circuit.json").read_text())
    status = main(["evaluate", str(alone / "circuit.json"), "--task", "induction", "--n", "8", "--out", str(tmp_path),
                   "--quiet"])  # fmt: skip
    assert status == 0
    assert "no curve" in capsys.readouterr().out
    assert "cpr" not in json.loads((tmp_path / "evaluation.json").read_text())


def test_evaluate_names_the_line_of_a_broken_scores_file(discovered, tmp_path, capsys):
    _, out = discovered
    broken = tmp_path / "scores.csv"
    lines = (out / "scores.csv").read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[0], "a0.h0->nowhere", 1)
    broken.write_text("\n".join(lines) + "\n")
    status = main(["evaluate", str(out / "circuit.json"), "--scores", str(broken), "--task", "induction", "--n", "8",
                   "--quiet"])  # fmt: skip
    assert status == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "scores.csv, line 4" in line and "nowhere" in line


def test_discovered_circuit_file_loads_with_its_edges(discovered, model_dir):
    _, out = discovered
    circuit = circuits.Circuit.load(out / "circuit.json", circuits.load_model(str(model_dir), device="cpu"))
    summary = json.loads((out / "summary.json").read_text())
    assert len(circuit) == summary["circuit"]["edges"]
    assert circuit.meta["task"] == "induction"


def test_evaluate_reports_the_faithfulness_discover_measured(discovered, tmp_path, capsys):
    _, out = discovered
    status = main(["evaluate", str(out / "circuit.json"), "--task", "induction", "--n", "8", "--out", str(tmp_path),
                   "--quiet"])  # fmt: skip
    assert status == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert result["faithfulness"] == pytest.approx(summary["evaluation"]["faithfulness"], abs=1e-5)
    assert result["cpr"] == pytest.approx(summary["curves"]["eap"]["cpr"], abs=1e-5)
    assert (tmp_path / "faithfulness.png").stat().st_size > 0
    assert "faithfulness" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".pdf", ".png", ".svg"])
def test_plot_writes_the_figure_in_the_format_of_its_extension(discovered, tmp_path, suffix):
    _, out = discovered
    figure = tmp_path / f"fig{suffix}"
    assert main(["plot", str(out / "circuit.json"), "-o", str(figure)]) == 0
    head = figure.read_bytes()[:8]
    assert {".pdf": b"%PDF", ".png": b"\x89PNG", ".svg": b"<?xml"}[suffix] in head or b"<svg" in head


def test_discover_with_acdc_refines_the_candidates(model_dir, tmp_path):
    out = tmp_path / "acdc"
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "8", "--method", "eap",
                   "--acdc", "--threshold", "0.001", "--candidates", "40", "--out", str(out), "--quiet"])  # fmt: skip
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acdc_threshold"] == 0.001
    assert summary["circuit"]["edges"] <= 40
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["meta"]["method"] == "acdc on eap candidates"


def test_discover_with_acdc_searches_the_signed_selection_of_candidates_on_the_chosen_metric(model_dir, tmp_path):
    out = tmp_path / "acdc-signed"
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "8", "--method", "eap",
                   "--acdc", "--threshold", "0", "--acdc-metric", "logit_diff", "--candidates", "30",
                   "--out", str(out), "--quiet"])  # fmt: skip
    assert status == 0
    model = circuits.load_model(str(model_dir))
    task = tasks.get("induction", model.tokenizer, n=8, seed=0)
    scores = circuits.attribute(model, task, "eap", progress=False)
    pool = select_circuit(scores, 30, "signed")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["acdc_metric"], summary["candidates"], summary["selection"]) == ("logit_diff", len(pool), "signed")
    found = json.loads((out / "circuit.json").read_text())
    kept = {edge for edge, entry in found["edges"].items() if entry["in_graph"]}
    assert kept and kept <= set(pool.edges)


def test_discover_runs_a_users_task_file(model_dir, tmp_path):
    out = tmp_path / "own"
    task_file = id_task_file(tmp_path / "mine.jsonl")
    status = main(["discover", "--model", str(model_dir), "--task-file", task_file, "--method", "eap", "--top-n", "10",
                   "--out", str(out), "--quiet"])  # fmt: skip
    assert status == 0
    assert json.loads((out / "summary.json").read_text())["task"] == "mine"


def test_unknown_task_exits_2_naming_it(model_dir, tmp_path, capsys):
    status = main(["discover", "--model", str(model_dir), "--task", "nonesuch", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    (line,) = error_lines(err)
    assert "unknown task 'nonesuch'" in line


def test_unknown_model_exits_2_naming_it(tmp_path, capsys):
    status = main(["discover", "--model", str(tmp_path / "no-model"), "--task", "ioi", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2
    (line,) = error_lines(err)
    assert "no-model" in line
    assert not (tmp_path / "o").exists()


def test_malformed_task_file_exits_2_naming_the_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean_ids": [1, 2], "corrupted_ids": [1, 3], "answer_ids": 4, "wrong_answer_ids": 5}\n{oops\n')
    status = main(["discover", "--model", str(model_dir), "--task-file", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2
    (line,) = error_lines(err)
    assert "line 2" in line and "bad.jsonl" in line


def test_task_file_example_that_cannot_be_patched_exits_2_naming_its_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "lengths.jsonl"
    bad.write_text('{"clean_ids": [1, 2, 3], "corrupted_ids": [1, 3], "answer_ids": 4, "wrong_answer_ids": 5}\n')
    status = main(["discover", "--model", str(model_dir), "--task-file", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2
    (line,) = error_lines(err)
    assert "lengths.jsonl, line 1:" in line


def test_missing_task_file_exits_2(model_dir, tmp_path, capsys):
    status = main(["discover", "--model", str(model_dir), "--task-file", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert status == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_bad_usage_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["discover", "--task", "ioi", "--top-n", "zero", "--model", "m", "--out", "o"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    (line,) = error_lines(err)
    assert "--top-n" in line


def test_plot_of_a_missing_circuit_file_exits_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "none.json"), "-o", str(tmp_path / "f.png")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_plot_refuses_an_unknown_figure_format(discovered, tmp_path, capsys):
    _, out = discovered
    assert main(["plot", str(out / "circuit.json"), "-o", str(tmp_path / "f.bmp")]) == 2
    assert "f.bmp" in capsys.readouterr().err


def test_tasks_lists_the_catalogue_one_line_each(capsys):
    from circuits import tasks

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(tasks.available())


def test_models_lists_the_bundled_model_and_every_model_type_with_its_variants(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[0] == "smollm2-135m" for line in lines if line.strip())
    listed = {line.split()[0]: line for line in lines if line.startswith("  ")}
    for model_type in circuits.arch.supported_model_types():
        assert model_type in listed and len(listed[model_type].split()) > 1, model_type


def test_python_dash_m_circuits_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "circuits", "tasks"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "ioi" in result.stdout


def test_a_bug_exits_1_with_a_short_message_and_the_debug_hint(model_dir, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch deep in torch\nmore lines of detail")

    monkeypatch.setattr("circuits.pipeline.attribute", broken)
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "4", "--method", "eap",
                   "--out", str(tmp_path / "o"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err and "more lines of detail" not in err
    assert "RuntimeError: shape mismatch deep in torch" in err and "CIRCUITS_DEBUG=1" in err


def test_circuits_debug_shows_the_traceback_of_a_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_DEBUG", "1")
    with pytest.raises(circuits.CircuitsError, match="none.json"):
        main(["plot", str(tmp_path / "none.json"), "-o", str(tmp_path / "f.png")])


def test_every_bad_input_error_of_the_package_is_a_circuits_error():
    # bad arguments to the API raise CircuitsError (a ValueError), which the CLI reports as exit status 2
    graph = circuits.Graph(2, 2)
    for bad_call in (
        lambda: graph.index("a0.h0->nowhere"),
        lambda: circuits.Task("t", [], [], [], []),
        lambda: tasks.get("nonesuch"),
        lambda: circuits.Circuit.load("/nonexistent/circuit.json"),
    ):
        with pytest.raises(circuits.CircuitsError):
            bad_call()
    assert issubclass(circuits.CircuitsError, ValueError)


def test_discover_by_position_keeps_edges_at_spans_and_evaluates_them(model_dir, tmp_path):
    out = tmp_path / "by-span"
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "8", "--method", "eap",
                   "--compare", "eap-ig-inputs", "--ig-steps", "2", "--top-n", "30", "--positions", "--out", str(out),
                   "--quiet"])  # fmt: skip
    assert status == 0
    circuit = circuits.Circuit.load(out / "circuit.json")
    assert circuit.spans.names == ("A", "B", "END", "rest")
    assert 0 < len(circuit) <= 30 and all("@" in edge for edge in circuit.edges)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["curves"]) == {"eap", "eap-ig-inputs"}


def test_discover_by_position_with_greedy_selection_exits_2_before_the_model_loads(tmp_path, capsys):
    status = main(["discover", "--model", str(tmp_path / "no-model"), "--task", "induction", "--positions", "--select",
                   "greedy", "--out", str(tmp_path / "o")])  # fmt: skip
    assert status == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "with positions" in line


def test_discover_by_position_with_acdc_searches_edges_at_spans(model_dir, tmp_path):
    out = tmp_path / "acdc-by-span"
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "8", "--method", "eap",
                   "--positions", "--acdc", "--threshold", "0.05", "--candidates", "60", "--acdc-metric",
                   "logit_diff", "--out", str(out), "--quiet"])  # fmt: skip
    assert status == 0
    circuit = circuits.Circuit.load(out / "circuit.json")
    assert circuit.spans is not None and 0 < len(circuit) <= 60
    assert circuit.meta["method"] == "acdc on eap candidates"


@pytest.mark.parametrize(("level", "word"), [("neuron", "output dimensions"), ("mlp-neuron", "MLP hidden units")])
def test_discover_at_a_neuron_level_keeps_the_best_neurons(model_dir, tmp_path, capsys, level, word):
    out = tmp_path / level
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "8", "--method", "eap",
                   "--level", level, "--top-n", "40", "--out", str(out), "--quiet"])  # fmt: skip
    assert status == 0
    circuit = circuits.Circuit.load(out / "circuit.json")
    assert circuit.level == level and len(circuit) == 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["circuit"]["level"] == level and summary["circuit"]["top_edges"][0]["edge"] in circuit.units
    assert f"40 {word}" in capsys.readouterr().out and f"40 {word}" in (out / "summary.md").read_text()


def test_discover_at_a_neuron_level_with_acdc_exits_2_before_the_model_loads(tmp_path, capsys):
    status = main(["discover", "--model", str(tmp_path / "no-model"), "--task", "induction", "--level", "neuron",
                   "--acdc", "--out", str(tmp_path / "o")])  # fmt: skip
    assert status == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "neuron-level circuit" in line
