"""Data-parallel runs on torch.distributed: two gloo ranks on 127.0.0.1, launched by torchrun as a user would,
end with the single-process results, bit for bit (tests/distributed_worker.py runs the same computations)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import BATCH, STOP_AFTER, THRESHOLD, results, setup

import circuits
from circuits.cli import main
from circuits.resume import read_checkpoint
from circuits.testing import tiny_hf

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("distributed_worker.py")
BOUND = 240  # seconds: a launch that takes longer counts as a hang
BIT_IDENTICAL = [
    "eap",
    "eap-ig-inputs",
    "eap-ig-activations",
    "eap-ig-mask",
    "clean-corrupted",
    "eap-mean",
    "exact",
    "exact-node",
    "eap-positions",
    "exact-positions",
    "eap-neuron",
    "eap-mlp-neuron",
    "curve",
    "cpr-cmd",
    "evaluation",
    "acdc",
]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc ARGS`` on this machine, every rank on one CPU thread."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRCUITS_DIST_TIMEOUT": "60"}
    return subprocess.run(command, capture_output=True, text=True, timeout=BOUND, env=env, cwd=WORKER.parent)


@pytest.fixture(scope="module")
def single():
    model, task = setup()
    return model, task, results(model, task)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    done = torchrun(str(WORKER), "results", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    from safetensors.torch import load_file

    return out, [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN (an edge that does not exist) where the other has NaN."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_the_ranks_compute_disjoint_batches_that_cover_the_task(launched, single):
    _, ranks = launched
    assert single[2]["eap-batches-computed"].tolist() == [0, 1, 2, 3]
    assert [saved["eap-batches-computed"].tolist() for saved in ranks] == [[0, 2], [1, 3]]


@pytest.mark.parametrize("name", BIT_IDENTICAL)
def test_two_ranks_end_with_the_single_process_result_bit_for_bit(name, launched, single):
    _, ranks = launched
    expected = single[2][name]
    for saved in ranks:
        assert int(saved["world_size"]) == 2
        assert identical(saved[name], expected), float(
            (saved[name].double() - expected.double()).nan_to_num().abs().max()
        )


def test_an_automatic_batch_size_gives_the_single_process_scores(launched, single):
    """The probe batch sizes every rank's batches alike (the smallest any rank measured); the layout may differ
    from one process's, so the sums may differ in their last bits."""
    _, ranks = launched
    expected = single[2]["eap-auto"]
    for saved in ranks:
        got = saved["eap-auto"]
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.allclose(
            got.nan_to_num(), expected.nan_to_num(), rtol=0, atol=1e-6 * float(expected.nan_to_num().abs().max())
        )


def test_an_acdc_search_started_on_two_ranks_resumes_on_one_to_the_same_circuit(launched, single, tmp_path):
    out, _ = launched
    model, task, expected = single
    path = tmp_path / "acdc.ckpt"
    shutil.copy(out / "acdc.ckpt", path)
    assert read_checkpoint(path).state["next"] == STOP_AFTER  # the two ranks stopped in the middle
    resumed = circuits.acdc(model, task, THRESHOLD, batch_size=BATCH, checkpoint=path, progress=False)
    assert torch.equal(resumed.mask, expected["acdc"])


def test_a_failure_on_one_rank_ends_every_rank_with_its_error(tmp_path):
    done = torchrun(str(WORKER), "fail", str(tmp_path))
    assert done.returncode != 0
    assert "ValueError: injected failure on rank 1" in done.stderr  # rank 1's own error
    assert (
        "RankFailure: rank 1 failed in batch 1 (examples 2-3): injected failure on rank 1" in done.stderr
    )  # rank 0, told by the exchange


def test_out_of_memory_on_one_rank_halves_the_batch_on_every_rank(tmp_path, single):
    done = torchrun(str(WORKER), "oom", str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    halvings = [line for line in done.stderr.splitlines() if "out of memory in a batch of 2 examples" in line]
    assert len(halvings) == 1  # said once, by rank 0
    from safetensors.torch import load_file

    ranks = [load_file(tmp_path / f"oom-rank{rank}.safetensors")["eap"] for rank in (0, 1)]
    assert identical(ranks[0], ranks[1])
    expected = single[2]["eap"]  # batches of one example after the failure: the same sums in another order
    atol = 1e-6 * float(expected.nan_to_num().abs().max())
    assert torch.allclose(ranks[0].nan_to_num(), expected.nan_to_num(), rtol=0, atol=atol)


def test_a_rank_that_dies_ends_the_whole_run(tmp_path):
    done = torchrun(str(WORKER), "die", str(tmp_path))  # within BOUND seconds, or subprocess raises TimeoutExpired
    assert done.returncode != 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf("llama").save_pretrained(path)
    return path


def test_torchrun_discover_writes_the_single_process_folder_once(model_dir, tmp_path):
    arguments = ["discover", "--model", str(model_dir), "--task", "induction", "--examples", "8", "--batch-size", "2"]
    arguments += ["--method", "eap", "--top-n", "20", "--quiet"]
    assert main([*arguments, "--out", str(tmp_path / "one")]) == 0
    done = torchrun("-m", "circuits", *arguments, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "two" / "scores.csv").read_text() == (tmp_path / "one" / "scores.csv").read_text()
    one, two = (json.loads((tmp_path / name / "circuit.json").read_text()) for name in ("one", "two"))
    assert two["edges"] == one["edges"]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert [summary["world_size"] for summary in summaries] == [1, 2]
    assert summaries[1]["evaluation"] == summaries[0]["evaluation"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote nothing beside


def test_every_command_line_option_reaches_the_command_through_torchrun():
    """torchrun parses its own options first, abbreviations included: each option of ours has a spelling that
    it passes through to ``circuits`` untouched (``--n``, ambiguous for torchrun, is also ``--examples``)."""
    from torch.distributed.run import get_args_parser

    from circuits.cli import build_parser

    torchrun_parser, commands = get_args_parser(), build_parser()._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            spellings = [option for option in action.option_strings if option.startswith("--")]
            passing = []
            for option in spellings:
                try:
                    parsed = torchrun_parser.parse_args(["-m", "circuits", name, option, "1"])
                except SystemExit:
                    continue
                if parsed.training_script_args == [name, option, "1"]:
                    passing.append(option)
            assert passing or not spellings, (name, spellings)


def test_init_outside_torchrun_is_one_process_on_the_default_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert circuits.distributed.init() == torch.device("cpu")
    assert (circuits.distributed.world_size(), circuits.distributed.rank(), circuits.distributed.is_main()) == (
        1,
        0,
        True,
    )


def test_init_names_what_torchrun_would_have_set(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(circuits.CircuitsError, match="MASTER_ADDR"):
        circuits.distributed.init()
