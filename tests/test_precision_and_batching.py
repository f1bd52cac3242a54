"""Reduced precision (bf16/fp16 models, fp32 scores and metrics) and batches that fit in memory (circuits.batching):
``batch_size="auto"``, an out-of-memory batch halved and retried, the same scores whatever the batch size, and
checkpoints that replay the batches actually used."""

from __future__ import annotations

import importlib

import pytest
import torch

import circuits
from circuits import batching, engine
from circuits.batching import PROBE, BatchPlan, parse_memory
from circuits.cli import main
from circuits.evaluate import masked_metrics
from circuits.methods import METHODS
from circuits.methods.common import ablation_mean
from circuits.resume import read_checkpoint
from circuits.testing import tiny_hf, tiny_task

acdc_module = importlib.import_module("circuits.methods.acdc")
exact_module = importlib.import_module("circuits.methods.exact")

N = 11  # examples: batch sizes 3 and 8 leave a short last batch
OPTIONS = dict(ig_steps=3, progress=False)
# Tolerance of a low-precision model's scores against the float32 model's: max |low - fp32| <= TOLERANCE * max
# |fp32|, i.e. 128 units of rounding (2^-9 for bf16's 8 significant bits, 2^-12 for fp16's 11). The differences
# are rounding compounded over the layers and enlarged by the cancellation in out - patch; over the seven tiny
# architectures and five methods the largest seen is about 70 units in either dtype, so 128 leaves a factor ~2.
TOLERANCE = {torch.bfloat16: 128 * 2**-9, torch.float16: 128 * 2**-12}
PEARSON = {torch.bfloat16: 0.99, torch.float16: 0.999}  # seen: >= 0.995 (bf16), >= 0.9999 (fp16)


def make_task(n=N, seed=1, metric="logit_diff"):
    return tiny_task(n, seed, metric)


@pytest.fixture(scope="module")
def model():
    return circuits.Model.from_hf(tiny_hf("llama"), name="tiny-llama")


@pytest.fixture(scope="module")
def task():
    return make_task()


@pytest.fixture(scope="module")
def acdc_options(model, task):
    """ACDC on the 20 best edges by EAP (a short search), threshold 0.02, no progress bars."""
    candidates = circuits.attribute(model, task, "eap", batch_size=N, **OPTIONS).top_edges(20)
    return dict(threshold=0.02, candidates=candidates, progress=False)


def low_precision(arch: str, dtype: torch.dtype) -> circuits.Model:
    return circuits.Model.from_hf(tiny_hf(arch).to(dtype), name=f"tiny-{arch}-{dtype}")


def close_to(reference: torch.Tensor, low: torch.Tensor, real: torch.Tensor, dtype: torch.dtype) -> None:
    a, b = reference[real].double(), low[real].double()
    assert float((a - b).abs().max()) <= TOLERANCE[dtype] * float(a.abs().max())
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) >= PEARSON[dtype]


def fake_peak(monkeypatch, bytes_per_token: float) -> None:
    """Every probe measures ``bytes_per_token`` times its tokens."""

    class Meter:
        def __init__(self, device):
            self.start = 0

        def bytes(self):
            return None

    def start_probe(plan, examples, tokens):
        meter = Meter(plan.device)
        meter.bytes = lambda: int(bytes_per_token * tokens)
        budget = plan.budget if plan.budget is not None else int(batching.HEADROOM * batching.free_memory(plan.device))
        plan._probe = (meter, budget, examples, tokens)

    monkeypatch.setattr(BatchPlan, "_start_probe", start_probe)


def out_of_memory_above(monkeypatch, model, k: int, error=None, calls=None) -> list[int]:
    """The model's unembedding raises an out-of-memory error for a batch of more than ``k`` examples (copies of
    a batch, as exact patching runs, count once). Returns the batch sizes that failed, in order."""
    adapter = model.adapter
    original = type(adapter).unembed
    failed: list[int] = []

    def unembed(final):
        rows = final.shape[0]
        if rows > k and (calls is None or len(failed) < calls):
            failed.append(rows)
            raise error if error is not None else torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
        return original(adapter, final)

    monkeypatch.setattr(adapter, "unembed", unembed)
    return failed


# --- reduced precision ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float32_scores(model, task):
    return {method: circuits.attribute(model, task, method, batch_size=4, **OPTIONS).tensor for method in METHODS}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_float32_finite_scores_close_to_the_float32_models(model, task, float32_scores, method,
                                                                             dtype):  # fmt: skip
    reference = float32_scores[method]
    scores = circuits.attribute(low_precision("llama", dtype), task, method, batch_size=4, **OPTIONS).tensor
    real = model.graph.real
    assert scores.dtype == torch.float32 and bool(torch.isfinite(scores[real]).all())
    close_to(reference, scores, real, dtype)


def test_float16_gradients_that_overflow_are_refused_naming_the_dtype_not_returned(task):
    """Zero ablation puts an integrated-gradients point at the all-zero input, where an RMSNorm's gradient is
    1/sqrt(eps) per layer: past float16's 65504 (bfloat16 has float32's range)."""
    with pytest.raises(circuits.CircuitsError, match="not finite .* in torch.float16; run in float32"):
        circuits.attribute(
            low_precision("llama", torch.float16), task, "eap-ig-inputs", "zero", batch_size=4, **OPTIONS
        )


@pytest.mark.parametrize("arch", ["gpt2", "neox"])  # LayerNorm with biases; parallel blocks
def test_eap_ig_in_bfloat16_is_close_to_float32_on_other_architectures(task, arch):
    reference = circuits.Model.from_hf(tiny_hf(arch), name=arch)
    expected = circuits.attribute(reference, task, "eap-ig-inputs", batch_size=4, **OPTIONS).tensor
    scores = circuits.attribute(low_precision(arch, torch.bfloat16), task, "eap-ig-inputs", batch_size=4, **OPTIONS)
    close_to(expected, scores.tensor, reference.graph.real, torch.bfloat16)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_bfloat16_scores_with_mean_and_zero_ablation_are_close_to_float32(model, task, ablation):
    reference = circuits.attribute(model, task, "eap", ablation, batch_size=4, **OPTIONS).tensor
    scores = circuits.attribute(low_precision("llama", torch.bfloat16), task, "eap", ablation, batch_size=4, **OPTIONS)
    close_to(reference, scores.tensor, model.graph.real, torch.bfloat16)


def test_bfloat16_evaluation_metrics_are_float32_and_close_to_float32(model, task):
    masks = [torch.rand(model.graph.n_src, model.graph.n_dst, generator=torch.Generator().manual_seed(0)) > 0.5]
    frame, values, _ = masked_metrics(model, task, masks, batch_size=4)
    low_frame, low_values, _ = masked_metrics(low_precision("llama", torch.bfloat16), task, masks, batch_size=4)
    assert low_frame["full"].dtype == "float32" and low_values[0].dtype == "float32"
    scale = float(frame["full"].abs().max())
    for column in ("full", "empty"):
        assert float((low_frame[column] - frame[column]).abs().max()) <= TOLERANCE[torch.bfloat16] * scale
    assert float(abs(low_values[0] - values[0]).max()) <= TOLERANCE[torch.bfloat16] * scale


def test_acdc_and_the_faithfulness_curve_run_in_bfloat16(task, acdc_options):
    low = low_precision("llama", torch.bfloat16)
    circuit = circuits.acdc(low, task, **acdc_options, batch_size=4)
    assert isinstance(circuit.meta["metric_value"], float)
    scores = circuits.attribute(low, task, "eap", batch_size=4, **OPTIONS)
    curve = circuits.faithfulness_curve(low, task, scores, batch_size=4)
    assert curve.frame.faithfulness.notna().all() and curve.cpr == curve.cpr


def test_mean_ablation_values_are_summed_in_float32_and_given_in_the_models_dtype(task):
    low = low_precision("llama", torch.bfloat16)
    tokenized = task.check(low)
    values = ablation_mean(low, tokenized, BatchPlan(1))
    total = 0
    for t in tokenized.batches(1):
        outputs = engine.source_outputs(low, t.clean_ids, t.attention_mask).double()
        total = total + (outputs * t.attention_mask.double()[None, :, :, None]).sum((1, 2))
    exact = total / tokenized.attention_mask.sum()
    assert values.dtype == torch.bfloat16
    assert bool(((values[:, 0, 0].double() - exact).abs() <= 2**-7 * exact.abs()).all())  # one bf16 unit at most


# --- the same scores whatever the batch size ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_scores_are_the_same_whatever_the_batch_size(model, task, method):
    reference = circuits.attribute(model, task, method, batch_size=N, **OPTIONS).tensor
    real = model.graph.real
    for batch_size in (1, 3, 8, "auto"):
        scores = circuits.attribute(model, task, method, batch_size=batch_size, **OPTIONS).tensor
        assert torch.allclose(scores[real], reference[real], rtol=0, atol=1e-5), batch_size


def test_mean_ablation_scores_are_the_same_whatever_the_batch_size(model, task):
    reference = circuits.attribute(model, task, "eap", "mean", batch_size=N, **OPTIONS).tensor
    real = model.graph.real
    for batch_size in (1, 3, 8, "auto"):
        scores = circuits.attribute(model, task, "eap", "mean", batch_size=batch_size, **OPTIONS).tensor
        assert torch.allclose(scores[real], reference[real], rtol=0, atol=1e-5), batch_size


def test_evaluation_is_the_same_whatever_the_batch_size(model, task):
    circuit = circuits.attribute(model, task, "eap", batch_size=N, **OPTIONS).top_n(20)
    reference = circuits.evaluate(model, task, circuit, batch_size=N)
    for batch_size in (1, 3, 8, "auto"):
        evaluation = circuits.evaluate(model, task, circuit, batch_size=batch_size)
        assert abs(evaluation.faithfulness - reference.faithfulness) <= 1e-5, batch_size
        assert (evaluation.per_example.circuit - reference.per_example.circuit).abs().max() <= 1e-5


def test_acdc_finds_the_same_circuit_whatever_the_batch_size(model, task, acdc_options):
    reference = circuits.acdc(model, task, **acdc_options, batch_size=N)
    for batch_size in (3, 8, "auto"):
        circuit = circuits.acdc(model, task, **acdc_options, batch_size=batch_size)
        assert circuit.edges == reference.edges, batch_size


# --- batch_size="auto" ---------------------------------------------------------------------------------------


def test_auto_lays_out_a_probe_then_as_many_examples_as_the_budget_allows(model, task, monkeypatch):
    fake_peak(monkeypatch, bytes_per_token=1000)
    width = int(task.check(model).attention_mask.sum(1).max())
    plan = BatchPlan("auto", max_memory=3 * 1000 * width)  # three examples of the longest prompt
    circuits.attribute(model, task, "eap", batch_size=plan, **OPTIONS)
    assert plan.sizes == [PROBE, 3, 3, 1]


def test_auto_budgets_a_share_of_the_free_memory_by_default(model, task, monkeypatch):
    fake_peak(monkeypatch, bytes_per_token=1000)
    width = int(task.check(model).attention_mask.sum(1).max())
    monkeypatch.setattr(batching, "free_memory", lambda device: int(5 * 1000 * width / batching.HEADROOM) + 1)
    plan = BatchPlan("auto")
    list(plan.spans([width] * N))
    assert plan.sizes == [PROBE, 5, 2]


def test_auto_measures_a_positive_peak_on_this_machine(model, task):
    plan = BatchPlan("auto", max_memory="64GiB")
    circuits.attribute(model, task, "eap", batch_size=plan, **OPTIONS)
    assert plan.sizes[0] == PROBE and plan.size >= 1 and sum(plan.sizes) == N


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("1.5 GB", 1_500_000_000), ("512mib", 2**29),
                                            ("100B", 100), (4096, 4096)])  # fmt: skip
def test_memory_sizes_are_read_with_their_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["8G", "lots", "-1GiB", 0, -5, True, 1.5])
def test_a_memory_size_without_a_known_unit_is_a_circuits_error_naming_it(text):
    with pytest.raises(circuits.CircuitsError, match=r"max_memory must be .* got"):
        parse_memory(text)


@pytest.mark.parametrize("batch_size", [0, -1, "big", 2.5, True, None])
def test_a_bad_batch_size_is_a_circuits_error_before_the_model_runs(model, task, batch_size):
    with pytest.raises(circuits.CircuitsError, match=r'batch_size must be a positive integer or "auto"'):
        circuits.attribute(model, task, "eap", batch_size=batch_size, **OPTIONS)


def test_a_bad_memory_budget_is_a_circuits_error_for_every_entry_point(model, task):
    circuit = circuits.attribute(model, task, "eap", batch_size=N, **OPTIONS).top_n(5)
    calls = [
        lambda: circuits.attribute(model, task, "eap", batch_size="auto", max_memory="8G", **OPTIONS),
        lambda: circuits.acdc(model, task, 0.1, batch_size="auto", max_memory="8G", progress=False, candidates=[]),
        lambda: circuits.evaluate(model, task, circuit, batch_size="auto", max_memory="8G"),
    ]
    for call in calls:
        with pytest.raises(circuits.CircuitsError, match="max_memory"):
            call()


def test_free_memory_is_positive_on_the_cpu():
    assert batching.free_memory(torch.device("cpu")) > 0


# --- out of memory: halve and retry ----------------------------------------------------------------------------


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "eap-ig-activations", "eap-ig-mask", "clean-corrupted"])
def test_an_out_of_memory_batch_is_halved_and_retried_giving_the_normal_result(model, task, monkeypatch, capsys,
                                                                               method):  # fmt: skip
    normal = circuits.attribute(model, task, method, batch_size=4, **OPTIONS).tensor
    capsys.readouterr()
    failed = out_of_memory_above(monkeypatch, model, 4)
    scores = circuits.attribute(model, task, method, batch_size=8, **OPTIONS).tensor
    assert failed == [8] and same_tensor(scores, normal)  # batches [0, 4) [4, 8) [8, 11), as with batch_size=4
    assert stderr_lines(capsys) == ["circuits: out of memory in a batch of 8 examples on cpu; retrying with 4"]


def test_batches_after_the_halved_one_keep_the_smaller_size(model, task, monkeypatch, capsys):
    failed = out_of_memory_above(monkeypatch, model, 2)
    plan = BatchPlan(8)
    circuits.attribute(model, task, "eap", batch_size=plan, **OPTIONS)
    assert failed == [8, 4] and plan.sizes == [2, 2, 2, 2, 2, 1]
    assert len(stderr_lines(capsys)) == 2


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to "
                     "allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"),
        MemoryError(),
    ],
)  # fmt: skip
def test_a_cpu_allocation_failure_is_retried_like_a_cuda_one(model, task, monkeypatch, capsys, error):
    normal = circuits.attribute(model, task, "eap", batch_size=4, **OPTIONS).tensor
    out_of_memory_above(monkeypatch, model, 4, error)
    assert same_tensor(circuits.attribute(model, task, "eap", batch_size=8, **OPTIONS).tensor, normal)
    assert len(stderr_lines(capsys)) == 1


def test_a_batch_of_one_example_that_does_not_fit_is_a_circuits_error(model, task, monkeypatch):
    out_of_memory_above(monkeypatch, model, 0)
    with pytest.raises(circuits.CircuitsError, match="out of memory with a batch of one example .*does not fit"):
        circuits.attribute(model, task, "eap", batch_size=2, **OPTIONS)


def test_an_error_that_is_not_out_of_memory_is_not_retried(model, task, monkeypatch, capsys):
    failed = out_of_memory_above(monkeypatch, model, 4, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        circuits.attribute(model, task, "eap", batch_size=8, **OPTIONS)
    assert failed == [8] and stderr_lines(capsys) == []


def test_an_auto_probe_that_runs_out_of_memory_is_halved(model, task, monkeypatch, capsys):
    normal = circuits.attribute(model, task, "eap", batch_size=2, **OPTIONS).tensor
    out_of_memory_above(monkeypatch, model, 2)
    plan = BatchPlan("auto")
    assert same_tensor(circuits.attribute(model, task, "eap", batch_size=plan, **OPTIONS).tensor, normal)
    assert plan.sizes == [2] * 5 + [1] and len(stderr_lines(capsys)) == 1


@pytest.mark.parametrize("level", ["edge", "node"])
def test_exact_patching_retries_a_batch_that_ran_out_of_memory_half_way(model, task, monkeypatch, capsys, level):
    """A failed batch has added part of its effects to the running sum: the retry starts from the sum before it.
    The tokens per forward halve with the batch, so the retry equals a run with half of both."""
    halved = exact_module.exact_scores(model, task, "patching", 4, level, False, exact_module.MAX_TOKENS // 2)
    original = engine.PrefixCache.run_ablations
    state = {"runs": 0}

    def failing(cache, units, from_layer, *rest):
        state["runs"] += 1
        if state["runs"] == 3:  # in the middle of the first batch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(cache, units, from_layer, *rest)

    monkeypatch.setattr(engine.PrefixCache, "run_ablations", failing)
    scores = circuits.attribute(model, task, "exact", batch_size=8, level=level, **OPTIONS).tensor
    real = model.graph.real if level == "edge" else slice(None)
    assert state["runs"] > 3 and torch.allclose(scores[real], halved[real], rtol=0, atol=1e-6)
    assert len(stderr_lines(capsys)) == 1


def test_evaluation_retries_an_out_of_memory_batch(model, task, monkeypatch, capsys):
    circuit = circuits.attribute(model, task, "eap", batch_size=N, **OPTIONS).top_n(20)
    normal = circuits.evaluate(model, task, circuit, batch_size=4)
    out_of_memory_above(monkeypatch, model, 4)
    evaluation = circuits.evaluate(model, task, circuit, batch_size=8)
    assert evaluation.per_example.equals(normal.per_example)
    assert len(stderr_lines(capsys)) == 1


def test_mean_ablation_retries_an_out_of_memory_batch(model, task, monkeypatch, capsys):
    normal = circuits.attribute(model, task, "eap", "mean", batch_size=4, **OPTIONS).tensor
    original = engine.source_outputs
    failed = []

    def source_outputs(m, ids, mask=None):
        if ids.shape[0] > 4:
            failed.append(ids.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(m, ids, mask)

    monkeypatch.setattr("circuits.methods.common.source_outputs", source_outputs)
    monkeypatch.setattr(engine, "source_outputs", source_outputs)
    scores = circuits.attribute(model, task, "eap", "mean", batch_size=8, **OPTIONS).tensor
    real = model.graph.real
    assert failed and torch.allclose(scores[real], normal[real], rtol=0, atol=1e-6)


def test_acdc_retries_an_out_of_memory_step_with_every_batch_halved(model, task, monkeypatch, capsys, acdc_options):
    normal = circuits.acdc(model, task, **acdc_options, batch_size=4)
    original = engine.PrefixCache.run
    state = {"runs": 0}

    def run(cache, edge_mask, from_layer):
        state["runs"] += 1
        if state["runs"] == 3:  # the first batch of the search's second evaluation (two batches of 8 and 3)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(cache, edge_mask, from_layer)

    monkeypatch.setattr(engine.PrefixCache, "run", run)
    circuit = circuits.acdc(model, task, **acdc_options, batch_size=8)
    assert circuit.edges == normal.edges
    assert stderr_lines(capsys) == ["circuits: out of memory in a batch of 8 examples on cpu; retrying with 4"]


# --- checkpoints replay the batches used -----------------------------------------------------------------------


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def interrupt_after_saves(monkeypatch, saves: int) -> None:
    """KeyboardInterrupt right after the checkpoint's save number ``saves`` (one per batch; ACDC: per destination)."""
    original = batching.PlannedCheckpoint.save
    count = {"n": 0}

    def save(self, state, tensors=None):
        original(self, state, tensors)
        count["n"] += 1
        if count["n"] >= saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(batching.PlannedCheckpoint, "save", save)


def test_a_resumed_run_continues_with_the_halved_batch_size_and_gives_the_identical_scores(model, task, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    with monkeypatch.context() as patch:
        out_of_memory_above(patch, model, 4)
        uninterrupted = circuits.attribute(model, task, "eap", batch_size=8, **OPTIONS).tensor
    path = tmp_path / "eap.ckpt"
    with monkeypatch.context() as patch:
        out_of_memory_above(patch, model, 4)
        interrupt_after_saves(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            circuits.attribute(model, task, "eap", batch_size=8, checkpoint=path, **OPTIONS)
    state = read_checkpoint(path).state
    assert state == {"next": 1, "batches": {"sizes": [[4, 1]], "size": 4, "halvings": 1}}
    resumed = circuits.attribute(model, task, "eap", batch_size=8, checkpoint=path, **OPTIONS).tensor  # memory free now
    assert same_tensor(resumed, uninterrupted)


def test_an_auto_checkpoint_replays_the_recorded_batches_whatever_the_memory_now(model, task, tmp_path, monkeypatch):
    width = int(task.check(model).attention_mask.sum(1).max())
    options = dict(batch_size="auto", max_memory=3 * 1000 * width, **OPTIONS)
    with monkeypatch.context() as patch:
        fake_peak(patch, bytes_per_token=1000)
        uninterrupted = circuits.attribute(model, task, "eap-ig-inputs", **options).tensor
    path = tmp_path / "auto.ckpt"
    with monkeypatch.context() as patch:
        fake_peak(patch, bytes_per_token=1000)
        interrupt_after_saves(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            circuits.attribute(model, task, "eap-ig-inputs", checkpoint=path, **options)
    assert read_checkpoint(path).state["batches"] == {"sizes": [[PROBE, 1], [3, 1]], "size": 3, "halvings": 0}
    with monkeypatch.context() as patch:
        fake_peak(patch, bytes_per_token=1)  # a thousand times more room: the recorded size is replayed anyway
        resumed = circuits.attribute(model, task, "eap-ig-inputs", checkpoint=path, **options).tensor
    assert same_tensor(resumed, uninterrupted)


def test_an_auto_checkpoint_is_fingerprinted_as_auto(model, task, tmp_path):
    path = tmp_path / "auto.ckpt"
    circuits.attribute(model, task, "eap", batch_size="auto", checkpoint=path, **OPTIONS)
    with pytest.raises(circuits.CircuitsError, match=r'batch_size \("auto" in the checkpoint, 4 now\) differs'):
        circuits.attribute(model, task, "eap", batch_size=4, checkpoint=path, **OPTIONS)


def test_a_mean_ablation_checkpoint_keeps_the_mean_it_was_computed_with(model, task, tmp_path, monkeypatch):
    uninterrupted = circuits.attribute(model, task, "eap", "mean", batch_size="auto", **OPTIONS).tensor
    path = tmp_path / "mean.ckpt"
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            circuits.attribute(model, task, "eap", "mean", batch_size="auto", checkpoint=path, **OPTIONS)
    assert "ablation_mean" in read_checkpoint(path).tensors
    resumed = circuits.attribute(model, task, "eap", "mean", batch_size="auto", checkpoint=path, **OPTIONS).tensor
    assert same_tensor(resumed, uninterrupted)


def test_a_resumed_acdc_replays_its_halved_batches(model, task, tmp_path, monkeypatch, acdc_options):
    with monkeypatch.context() as patch:
        out_of_memory_above(patch, model, 4)
        uninterrupted = circuits.acdc(model, task, **acdc_options, batch_size=8)
    path = tmp_path / "acdc.ckpt"
    with monkeypatch.context() as patch:
        out_of_memory_above(patch, model, 4)
        interrupt_after_saves(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            circuits.acdc(model, task, **acdc_options, batch_size=8, checkpoint=path)
    assert read_checkpoint(path).state["batches"]["sizes"] == [[4, 2], [3, 1]]
    resumed = circuits.acdc(model, task, **acdc_options, batch_size=8, checkpoint=path)
    assert resumed.edges == uninterrupted.edges and resumed.meta["metric_value"] == uninterrupted.meta["metric_value"]


# --- the command line ------------------------------------------------------------------------------------------


def test_the_command_line_batch_size_is_auto_by_default():
    from circuits.cli import build_parser

    args = build_parser().parse_args(["discover", "--model", "m", "--task", "ioi", "--out", "x"])
    assert args.batch_size == "auto" and args.batch_memory is None


@pytest.mark.parametrize("flags, message", [(["--batch-size", "0"], "expected a positive integer or auto"),
                                            (["--batch-memory", "8G"], "units B, KB")])  # fmt: skip
def test_a_bad_batch_size_or_memory_on_the_command_line_is_one_line_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["discover", "--model", "m", "--task", "ioi", "--out", "x", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_discover_runs_with_auto_batches_and_a_memory_budget_in_bfloat16(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_hf("llama").save_pretrained(model_dir)
    out = tmp_path / "run"
    status = main(["discover", "--model", str(model_dir), "--task", "induction", "--n", "6", "--method", "eap",
                   "--top-n", "10", "--dtype", "bfloat16", "--batch-memory", "1GiB", "--out", str(out),
                   "--quiet"])  # fmt: skip
    assert status == 0 and (out / "summary.json").is_file()
