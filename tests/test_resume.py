"""Resumable work (circuits.resume): checkpoints carry a fingerprint of everything that determines their result,
resume to the identical result, report the true cost, and survive a killed process."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import circuits
from circuits import resume
from circuits.cli import main
from circuits.methods import gradient
from circuits.resume import Checkpoint, read_checkpoint
from circuits.testing import tiny_hf, tiny_task

acdc_module = importlib.import_module("circuits.methods.acdc")  # the package exports the function under this name
exact_module = importlib.import_module("circuits.methods.exact")


def make_task(seed=1, batch=6, metric="logit_diff", name="tiny"):
    return tiny_task(batch, seed, metric, name)


@pytest.fixture(scope="module")
def model():
    return circuits.Model.from_hf(tiny_hf("llama"), name="tiny-llama")


@pytest.fixture(scope="module")
def task():
    return make_task()


def interrupt_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make ``module.name`` raise KeyboardInterrupt on its call number ``calls + 1`` (after ``calls`` ran)."""
    original = getattr(module, name)
    count = {"n": 0}

    def interrupting(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


# --- the mechanism --------------------------------------------------------------------------


def test_a_checkpoint_gives_back_its_state_and_tensors_bit_for_bit(tmp_path):
    checkpoint = Checkpoint(tmp_path / "x.ckpt", {"method": '"eap"'})
    tensors = {"scores": torch.randn(5, 7), "kept": torch.rand(5, 7) > 0.5}
    checkpoint.save({"next": 3, "current": 0.1 + 0.2}, tensors)
    saved = checkpoint.load()
    assert saved.state == {"next": 3, "current": 0.1 + 0.2}
    assert all(torch.equal(saved.tensors[name], tensor) for name, tensor in tensors.items())


def test_a_missing_checkpoint_file_means_nothing_to_resume(tmp_path):
    assert Checkpoint(tmp_path / "none.ckpt", {}).load() is None


@pytest.mark.parametrize("content", [b"", b"{not json", b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage"])
def test_an_unreadable_checkpoint_is_a_circuits_error_saying_to_delete_it(tmp_path, content):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(circuits.CircuitsError, match="x.ckpt is unreadable .*delete it"):
        Checkpoint(path, {}).load()


def test_a_truncated_checkpoint_is_a_circuits_error(tmp_path):
    path = tmp_path / "x.ckpt"
    Checkpoint(path, {"a": "1"}).save({"next": 1}, {"scores": torch.zeros(100)})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(circuits.CircuitsError, match="unreadable"):
        Checkpoint(path, {"a": "1"}).load()


def test_a_checkpoint_of_another_fingerprint_names_every_part_that_differs(tmp_path):
    path = tmp_path / "acdc.ckpt"
    Checkpoint(path, {"task content": "sha256:aa", "threshold": "0.5", "method": '"acdc"'}).save({})
    with pytest.raises(
        circuits.CircuitsError,
        match=r"checkpoint acdc.ckpt belongs to another run: task content and threshold \(0.5 in the checkpoint, "
        r"0.1 now\) differ; use another path or delete it",
    ):
        Checkpoint(path, {"task content": "sha256:bb", "threshold": "0.1", "method": '"acdc"'}).load()


def test_a_folder_is_not_a_checkpoint_path(tmp_path):
    with pytest.raises(circuits.CircuitsError, match="is a folder"):
        Checkpoint(tmp_path, {})


def test_the_fingerprint_covers_task_content_metric_model_config_weights_and_parameters(model, task):
    parts = resume.fingerprint(model, task, {"method": "eap", "candidates": torch.ones(3, 3, dtype=torch.bool)})
    assert list(parts) == ["task content", "task metric", "model config", "model weights", "method", "candidates"]
    assert parts["method"] == '"eap"' and parts["candidates"].startswith("sha256:")


def test_the_task_name_is_not_part_of_the_fingerprint_but_its_examples_are(model):
    renamed = resume.task_fingerprint(make_task(name="other"))
    assert renamed == resume.task_fingerprint(make_task())
    assert resume.task_fingerprint(make_task(seed=2)) != resume.task_fingerprint(make_task())


def first_logit(logits, batch):
    return logits[:, 0]


def second_logit(logits, batch):
    return logits[:, 1]


def with_metric(metric):
    task = make_task()
    task._set_metric(metric, True)
    return task


def test_a_callable_metric_is_fingerprinted_by_its_qualified_name():
    first = resume.task_fingerprint(with_metric(first_logit))["task metric"]
    assert resume.task_fingerprint(with_metric(first_logit))["task metric"] == first
    assert resume.task_fingerprint(with_metric(second_logit))["task metric"] != first


def test_the_weights_digest_is_computed_once_per_model_until_a_weight_changes(monkeypatch):
    model = circuits.Model.from_hf(tiny_hf("llama"))
    hashed = {"n": 0}
    original = resume._hash_tensor

    def counting(*args):
        hashed["n"] += 1
        original(*args)

    monkeypatch.setattr(resume, "_hash_tensor", counting)
    first = resume.weights_digest(model)
    count = hashed["n"]
    assert resume.weights_digest(model) == first and hashed["n"] == count
    with torch.no_grad():
        model.hf.lm_head.weight[0, 0] += 1
    assert resume.weights_digest(model) != first


def test_the_same_weights_give_the_same_digest_in_another_model_object():
    assert resume.weights_digest(circuits.Model.from_hf(tiny_hf("llama"))) == resume.weights_digest(
        circuits.Model.from_hf(tiny_hf("llama"))
    )


# --- attribution: checkpoint per batch ---------------------------------------------------------

BATCH_FUNCTIONS = {"eap": (gradient, "_batch_scores"), "eap-ig-inputs": (gradient, "_batch_scores")}
BATCH_FUNCTIONS["exact"] = (exact_module, "_batch_effects")


@pytest.mark.parametrize("method, level", [("eap", "edge"), ("eap-ig-inputs", "edge"), ("exact", "edge"),
                                           ("exact", "node")])  # fmt: skip
def test_a_resumed_attribution_equals_the_uninterrupted_tensor_exactly(model, task, tmp_path, monkeypatch, method,
                                                                       level):  # fmt: skip
    options = dict(method=method, level=level, batch_size=2, ig_steps=3, progress=False)
    uninterrupted = circuits.attribute(model, task, **options)
    path = tmp_path / "attribution.ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, *BATCH_FUNCTIONS[method], calls=2)
        with pytest.raises(KeyboardInterrupt):
            circuits.attribute(model, task, **options, checkpoint=path)
    assert read_checkpoint(path).state == {"next": 2, "batches": {"sizes": [[2, 2]], "size": 2, "halvings": 0}}
    resumed = circuits.attribute(model, task, **options, checkpoint=path)
    assert same_tensor(resumed.tensor, uninterrupted.tensor)


def test_a_resumed_attribution_runs_only_the_batches_left(model, task, tmp_path, monkeypatch):
    path = tmp_path / "attribution.ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, gradient, "_batch_scores", calls=1)
        with pytest.raises(KeyboardInterrupt):
            circuits.attribute(model, task, "eap", batch_size=2, progress=False, checkpoint=path)
    ran = []
    original = gradient._batch_scores
    monkeypatch.setattr(gradient, "_batch_scores", lambda m, t, batch, **k: ran.append(batch.tokens.start) or
                        original(m, t, batch, **k))  # fmt: skip
    circuits.attribute(model, task, "eap", batch_size=2, progress=False, checkpoint=path)
    assert ran == [2, 4]


def test_a_finished_attribution_checkpoint_returns_its_scores_without_running_a_batch(model, task, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    path = tmp_path / "attribution.ckpt"
    first = circuits.attribute(model, task, "eap", batch_size=2, progress=False, checkpoint=path)
    interrupt_after(monkeypatch, gradient, "_batch_scores", calls=0)
    again = circuits.attribute(model, task, "eap", batch_size=2, progress=False, checkpoint=path)
    assert same_tensor(again.tensor, first.tensor)


def test_an_attribution_checkpoint_of_other_examples_with_the_same_name_and_size_is_refused(model, tmp_path):
    path = tmp_path / "attribution.ckpt"
    circuits.attribute(model, make_task(seed=1), "eap", progress=False, checkpoint=path)
    with pytest.raises(circuits.CircuitsError, match="belongs to another run: task content differs"):
        circuits.attribute(model, make_task(seed=2), "eap", progress=False, checkpoint=path)


def test_an_attribution_checkpoint_of_other_model_weights_is_refused(model, task, tmp_path):
    path = tmp_path / "attribution.ckpt"
    circuits.attribute(model, task, "eap", progress=False, checkpoint=path)
    other = circuits.Model.from_hf(tiny_hf("llama", seed=1), name="tiny-llama")
    with pytest.raises(circuits.CircuitsError, match="belongs to another run: model weights differs"):
        circuits.attribute(other, task, "eap", progress=False, checkpoint=path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="eap-ig-inputs"), r'method \("eap" in the checkpoint, "eap-ig-inputs" now\)'),
        (dict(batch_size=3), r"batch_size \(2 in the checkpoint, 3 now\)"),
        (dict(ablation="mean"), "ablation"),
        (dict(level="node"), "level"),
    ],
)
def test_an_attribution_checkpoint_of_other_parameters_is_refused_naming_them(model, task, tmp_path, change,
                                                                              message):  # fmt: skip
    path = tmp_path / "attribution.ckpt"
    options = dict(method="eap", batch_size=2, progress=False)
    circuits.attribute(model, task, **options, checkpoint=path)
    with pytest.raises(circuits.CircuitsError, match=message):
        circuits.attribute(model, task, **{**options, **change}, checkpoint=path)


def test_an_attribution_checkpoint_of_another_metric_is_refused(model, tmp_path):
    path = tmp_path / "attribution.ckpt"
    circuits.attribute(model, make_task(), "eap", progress=False, checkpoint=path)
    with pytest.raises(circuits.CircuitsError, match="task metric"):
        circuits.attribute(model, make_task(metric="prob_diff"), "eap", progress=False, checkpoint=path)


# --- ACDC: checkpoint per destination ---------------------------------------------------------


def test_an_acdc_checkpoint_of_other_examples_with_the_same_name_and_size_is_refused(model, tmp_path):
    path = tmp_path / "acdc.ckpt"
    circuits.acdc(model, make_task(seed=1), threshold=0.5, checkpoint=path, progress=False)
    with pytest.raises(circuits.CircuitsError, match="acdc.ckpt belongs to another run: task content differs"):
        circuits.acdc(model, make_task(seed=2), threshold=0.5, checkpoint=path, progress=False)


def test_an_acdc_checkpoint_of_other_examples_and_threshold_names_both(model, tmp_path):
    path = tmp_path / "acdc.ckpt"
    circuits.acdc(model, make_task(seed=1), threshold=0.5, checkpoint=path, progress=False)
    with pytest.raises(circuits.CircuitsError, match=r"task content and threshold \(0.5 in the checkpoint, 0.1 now\)"):
        circuits.acdc(model, make_task(seed=2), threshold=0.1, checkpoint=path, progress=False)


def test_an_acdc_checkpoint_of_other_candidates_is_refused(model, task, tmp_path):
    path = tmp_path / "acdc.ckpt"
    edges = model.graph.edges
    circuits.acdc(model, task, threshold=0.5, candidates=edges[:40], checkpoint=path, progress=False)
    with pytest.raises(circuits.CircuitsError, match="candidates differs"):
        circuits.acdc(model, task, threshold=0.5, candidates=edges[:41], checkpoint=path, progress=False)


def test_an_acdc_checkpoint_of_other_model_weights_is_refused(model, task, tmp_path):
    path = tmp_path / "acdc.ckpt"
    circuits.acdc(model, task, threshold=0.5, checkpoint=path, progress=False)
    other = circuits.Model.from_hf(tiny_hf("llama", seed=1))
    with pytest.raises(circuits.CircuitsError, match="model weights differs"):
        circuits.acdc(other, task, threshold=0.5, checkpoint=path, progress=False)


def interrupted_acdc(model, task, path, monkeypatch, destinations: int, **options):
    """Run ACDC with a checkpoint until ``destinations`` destinations are saved, then interrupt it."""
    original = Checkpoint.save
    saves = {"n": 0}

    def save_then_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        saves["n"] += 1
        if saves["n"] == destinations:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "save", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            circuits.acdc(model, task, checkpoint=path, progress=False, **options)


def test_a_resumed_acdc_gives_the_uninterrupted_circuit(model, task, tmp_path, monkeypatch):
    options = dict(threshold=0.02, batch_size=4)
    uninterrupted = circuits.acdc(model, task, **options, progress=False)
    path = tmp_path / "acdc.ckpt"
    interrupted_acdc(model, task, path, monkeypatch, destinations=9, **options)
    assert read_checkpoint(path).state["next"] == 9
    resumed = circuits.acdc(model, task, **options, checkpoint=path, progress=False)
    assert torch.equal(resumed.mask, uninterrupted.mask)
    assert resumed.meta["metric_value"] == uninterrupted.meta["metric_value"]
    assert resumed.meta["steps"] == uninterrupted.meta["steps"]


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_a_resumed_acdc_reports_the_true_cost_the_work_before_the_interruption_included(
    model, task, tmp_path, monkeypatch, reuse_prefix
):
    options = dict(threshold=0.02, batch_size=4, reuse_prefix=reuse_prefix)
    uninterrupted = circuits.acdc(model, task, **options, progress=False).meta
    path = tmp_path / "acdc.ckpt"
    interrupted_acdc(model, task, path, monkeypatch, destinations=9, **options)
    resumed = circuits.acdc(model, task, **options, checkpoint=path, progress=False).meta
    # the second run redoes the clean runs (and the prefix runs): one (two) forward equivalents more, no less
    restart = 2 if reuse_prefix else 1
    assert resumed["forward_equivalents"] == pytest.approx(uninterrupted["forward_equivalents"] + restart)
    without = uninterrupted["forward_equivalents_without_prefix_reuse"]
    assert resumed["forward_equivalents_without_prefix_reuse"] == pytest.approx(without + 1)


def test_a_finished_acdc_checkpoint_returns_the_circuit_and_its_cost_without_running_the_model(
    model, task, tmp_path, monkeypatch
):
    path = tmp_path / "acdc.ckpt"
    first = circuits.acdc(model, task, threshold=0.02, checkpoint=path, progress=False)
    interrupt_after(monkeypatch, acdc_module, "_Scorer", calls=0)
    again = circuits.acdc(model, task, threshold=0.02, checkpoint=path, progress=False)
    assert torch.equal(again.mask, first.mask) and again.meta == first.meta


# --- eap with a metric minimal at the clean run -------------------------------------------------


@pytest.mark.parametrize("metric", ["kl", "l2"])
def test_eap_with_a_metric_minimal_at_the_clean_run_is_refused_saying_what_to_use(model, metric):
    with pytest.raises(circuits.CircuitsError, match=rf"'eap' .*clean run.*{metric}.*zero.*eap-ig-inputs.*logit_diff"):
        circuits.attribute(model, make_task(metric=metric), "eap", progress=False)


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations", "eap-ig-mask", "clean-corrupted", "exact"])
def test_methods_with_gradients_away_from_the_clean_run_accept_kl(model, method):
    scores = circuits.attribute(model, make_task(metric="kl"), method, ig_steps=2, progress=False)
    assert scores.tensor[model.graph.real].abs().max() > 1e-4


def test_the_refusal_follows_the_registered_gradient_points_not_the_method_name(model, monkeypatch):
    monkeypatch.setitem(gradient.GRADIENT_METHODS, "eap-ig-inputs", gradient.GradientMethod(lambda s: [(1.0, None)]))
    with pytest.raises(circuits.CircuitsError, match="'eap-ig-inputs' takes its gradients at the clean run only"):
        circuits.attribute(model, make_task(metric="kl"), "eap-ig-inputs", progress=False)


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf("llama").save_pretrained(path)
    return path


def discover_args(model_dir, out, *extra):
    return ["discover", "--model", str(model_dir), "--task", "induction", "--n", "8", "--method", "eap-ig-inputs",
            "--ig-steps", "2", "--top-n", "20", "--out", str(out), "--quiet", *extra]  # fmt: skip


def test_the_cli_refuses_eap_with_kl_before_loading_the_model(tmp_path, capsys):
    status = main(["discover", "--model", str(tmp_path / "no-such-model"), "--task", "induction", "--method", "eap",
                   "--metric", "kl", "--out", str(tmp_path / "out")])  # fmt: skip
    assert status == 2
    assert "'eap' takes its gradients at the clean run only" in capsys.readouterr().err


def test_the_cli_refuses_a_compared_eap_with_l2(tmp_path, capsys):
    status = main(["discover", "--model", str(tmp_path / "no-such-model"), "--task", "induction", "--metric", "l2",
                   "--method", "eap-ig-inputs", "--compare", "eap", "--out", str(tmp_path / "out")])  # fmt: skip
    assert status == 2
    assert "'eap' takes its gradients" in capsys.readouterr().err


def test_discover_with_a_checkpoint_folder_keeps_one_file_per_phase(model_dir, tmp_path):
    folder = tmp_path / "ckpt"
    args = discover_args(model_dir, tmp_path / "out", "--acdc", "--candidates", "30", "--compare", "eap",
                         "--checkpoint", str(folder))  # fmt: skip
    assert main(args) == 0
    files = {"run.ckpt", "attribution.ckpt", "acdc.ckpt", "attribution-eap.ckpt"}
    assert {path.name for path in folder.iterdir()} == files


def test_rerunning_a_finished_discover_with_its_checkpoint_folder_writes_identical_outputs(model_dir, tmp_path):
    folder = tmp_path / "ckpt"
    assert main(discover_args(model_dir, tmp_path / "first", "--acdc", "--checkpoint", str(folder))) == 0
    assert main(discover_args(model_dir, tmp_path / "again", "--acdc", "--checkpoint", str(folder))) == 0
    for name in ("circuit.json", "scores.csv"):
        first, again = (tmp_path / "first" / name).read_text(), (tmp_path / "again" / name).read_text()
        if name == "circuit.json":  # meta holds the true cost and timings, which differ
            first, again = (json.loads(text)["edges"] for text in (first, again))
        assert first == again, name


def test_discover_with_the_checkpoint_folder_of_another_command_exits_2_naming_what_differs(model_dir, tmp_path,
                                                                                            capsys):  # fmt: skip
    folder = tmp_path / "ckpt"
    assert main(discover_args(model_dir, tmp_path / "a", "--acdc", "--checkpoint", str(folder))) == 0
    capsys.readouterr()
    other = discover_args(model_dir, tmp_path / "b", "--acdc", "--threshold", "0.5", "--checkpoint", str(folder))
    assert main(other) == 2
    err = capsys.readouterr().err
    assert f"checkpoint folder {folder} belongs to another run: acdc_threshold (0.01 in the checkpoint, 0.5 now)" in err


def test_discover_with_the_checkpoint_folder_of_other_examples_exits_2(model_dir, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    assert main(discover_args(model_dir, tmp_path / "a", "--checkpoint", str(folder))) == 0
    capsys.readouterr()
    assert main(discover_args(model_dir, tmp_path / "b", "--seed", "1", "--checkpoint", str(folder))) == 2
    assert "belongs to another run: task content differs" in capsys.readouterr().err


def test_a_checkpoint_folder_inside_the_output_folder_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(discover_args(model_dir, out, "--checkpoint", str(out / "ckpt"))) == 2
    assert "is inside the output folder" in capsys.readouterr().err


def test_an_interrupted_discover_exits_130_hinting_at_checkpoint(model_dir, tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, gradient, "_batch_scores", calls=1)
    assert main(discover_args(model_dir, tmp_path / "out", "--batch-size", "4")) == 130
    assert "rerun with --checkpoint DIR to make a long run resumable" in capsys.readouterr().err


def test_an_interrupted_discover_with_a_checkpoint_says_the_same_command_resumes(model_dir, tmp_path, monkeypatch,
                                                                                  capsys):  # fmt: skip
    interrupt_after(monkeypatch, gradient, "_batch_scores", calls=1)
    folder = tmp_path / "ckpt"
    assert main(discover_args(model_dir, tmp_path / "out", "--batch-size", "4", "--checkpoint", str(folder))) == 130
    assert f"rerun the same command to resume from {folder}" in capsys.readouterr().err
    assert read_checkpoint(folder / "attribution.ckpt").state["next"] == 1


# --- a killed process (kill -9) resumes to the uninterrupted outputs --------------------------------

# Slow enough per unit (batch 1, many IG steps, 100 ACDC candidates) that a kill lands inside a phase; one thread
# each, so that runs beside other work on a busy machine keep their pace (and every run computes alike).
FAULT_RUN = ["--task", "induction", "--n", "16", "--batch-size", "1", "--method", "eap-ig-inputs", "--ig-steps", "30",
             "--acdc", "--candidates", "100", "--threshold", "0.0005", "--quiet"]  # fmt: skip
FAULT_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def discover_command(model_dir, out, *extra):
    return [sys.executable, "-m", "circuits", "discover", "--model", str(model_dir), *FAULT_RUN, "--out", str(out),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """The outputs of the fault runs' command without a checkpoint, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run(discover_command(model_dir, out), check=True, capture_output=True, env=FAULT_ENV)
    return out


def kill_when(process: subprocess.Popen, path, done: int, total: int) -> None:
    """SIGKILL ``process`` once checkpoint ``path`` shows ``done`` units of ``total`` finished (and fewer than all)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        if path.exists() and read_checkpoint(path).state.get("next", 0) >= done:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            assert read_checkpoint(path).state["next"] < total, "the phase finished before the kill"
            return
        time.sleep(0.005)
    raise AssertionError(f"no progress in {path} within 60 s")


def assert_same_outputs(out, reference) -> None:
    edges = [json.loads((folder / "circuit.json").read_text())["edges"] for folder in (out, reference)]
    assert edges[0] == edges[1]
    assert (out / "scores.csv").read_text() == (reference / "scores.csv").read_text()


@pytest.mark.parametrize("phase, done, total", [("attribution", 2, 16), ("acdc", 2, None)])
def test_a_discover_killed_during_a_phase_resumes_to_the_uninterrupted_outputs(model_dir, reference, tmp_path,
                                                                                phase, done, total):  # fmt: skip
    folder, out = tmp_path / "ckpt", tmp_path / "out"
    command = discover_command(model_dir, out, "--checkpoint", str(folder))
    total = total or circuits.load_model(str(model_dir), device="cpu").graph.n_dst
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=FAULT_ENV)
    kill_when(process, folder / f"{phase}.ckpt", done, total)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    subprocess.run(command, check=True, capture_output=True, env=FAULT_ENV)
    assert_same_outputs(out, reference)
