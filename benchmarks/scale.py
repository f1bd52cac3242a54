"""Attribution at real model sizes: seconds and peak memory against the plain HF model, by model and prompt length.

Random-weight models with the shapes of SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and -3B (float32) and
Llama-3.1-8B (bfloat16), built from transformers configs without a download and without the default
initialisation (uniform random weights, norm weights 1). For each shape x method (eap, eap-ig-inputs) x
prompt length T, on one batch of B random prompts (the corrupted prompt changes the last 3 tokens, or
--changed; random answers): the seconds and the peak memory of ``circuits.attribute``, and of the plain HF
model's floor on the same batch in the same process (as benchmarks/attribution.py: 2 no-grad forwards +
1 forward/backward for EAP, ig_steps for EAP-IG, gradients to the input embeddings only; here with the
prediction position's logits only, as the engine computes them), their ratios, and the edge count.

Each shape runs in a child process of its own (the model is built once there and freed with it), under
the allocator settings of _measure.child_memory, so that the resident set follows live memory; a call's
seconds and its peak memory above what is held before it (the weights) come from the same calls. The child
cannot take more memory than was available when it started (an address-space limit; --memory-limit):
a row that needs more is recorded as "out of memory" instead of pushing other work on the machine into swap
or the OOM killer. Rows are written to results/scale/scale.csv as they finish; a rerun skips the rows
already there (--force measures them again), then rewrites results/scale/scale.png and README.md.

    .venv/bin/python benchmarks/scale.py                      # every shape; about 40 minutes on 2 CPU cores
    .venv/bin/python benchmarks/scale.py --shapes smollm2-135m qwen2.5-0.5b --lengths 16 64 --methods eap
    .venv/bin/python benchmarks/scale.py --force              # measure again (after an engine change)
    .venv/bin/python benchmarks/scale.py --report             # only redraw the figure and README from the CSV
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path

import torch
from _measure import MEMORY_ENV, peak_memory, timed_call

import circuits
from circuits.io import atomic_write_text
from circuits.task import metric_values

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "scale"
METHODS = ("eap", "eap-ig-inputs")
LENGTHS = (16, 64, 256)
CHANGED = 3  # by default the corrupted prompt differs from the clean one in its last CHANGED tokens
BOUND = 0.02 * 3**0.5  # uniform weights with standard deviation 0.02
MIN_SECONDS = 2.0  # a case shorter than this is repeated (up to REPEATS calls) and the median taken
REPEATS = 5
WARM_UP_LENGTH = 4  # every case is called once on prompts this long before the first row: one-time costs
COLUMNS = [
    "shape", "params", "edges", "n_src", "n_dst", "method", "ig_steps", "B", "T", "changed", "dtype", "device",
    "seconds", "floor_seconds", "time_ratio", "peak_bytes", "floor_peak_bytes", "memory_ratio",
    "weight_bytes", "threads", "status", "load", "date",
]  # fmt: skip
KEY = ("shape", "method", "ig_steps", "B", "T", "changed", "device")


@dataclass(frozen=True)
class Shape:
    """A published model's shape: what the time and memory of attribution depend on."""

    name: str
    family: str  # "llama" or "qwen2" (q/k/v biases)
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tied: bool
    dtype: torch.dtype = torch.float32
    lengths: tuple[int, ...] = LENGTHS  # the default grid of this shape
    methods: tuple[str, ...] = METHODS

    def config(self):
        from transformers import LlamaConfig, Qwen2Config

        kind = {"llama": LlamaConfig, "qwen2": Qwen2Config}[self.family]
        return kind(
            num_hidden_layers=self.layers,
            hidden_size=self.d_model,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.mlp,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tied,
            max_position_embeddings=4096,
            use_cache=False,
        )


SHAPES = {
    shape.name: shape
    for shape in (
        # name, family, layers, d_model, query heads, key/value heads, MLP width, vocabulary
        Shape("smollm2-135m", "llama", 30, 576, 9, 3, 1536, 49152, tied=True),
        Shape("qwen2.5-0.5b", "qwen2", 24, 896, 14, 2, 4864, 151936, tied=True),
        Shape("llama-3.2-1b", "llama", 16, 2048, 32, 8, 8192, 128256, tied=True),
        Shape("llama-3.2-3b", "llama", 28, 3072, 24, 8, 8192, 128256, tied=True),
        # 16 GB of weights: only the proof that it fits (one row) by default
        Shape(
            "llama-3.1-8b",
            "llama",
            32,
            4096,
            32,
            8,
            14336,
            128256,
            tied=False,
            dtype=torch.bfloat16,
            lengths=(32,),
            methods=("eap",),
        ),
    )
}


# --- the child process: one shape ---------------------------------------------------------------------------


def skeleton(shape: Shape):
    """The HF model with this shape, its parameters on the meta device (no memory) and tied there; buffers (the
    rotary tables) computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        hf = AutoModelForCausalLM.from_config(shape.config(), dtype=shape.dtype)
    hf.tie_weights()
    return hf


def allocate(hf, device: torch.device):
    """Give every parameter memory on ``device`` in the model's dtype, once per tied parameter (no float32 copy,
    no transient untied output matrix), filled with uniform random values (the default initialisation takes
    minutes for billions of weights on a few cores), norm weights 1; frozen: gradients go to the inputs only,
    in the floor and in the engine alike."""
    generator = torch.Generator(device).manual_seed(0)
    allocated: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for module_name, module in hf.named_modules():
            for name, meta in list(module._parameters.items()):
                if meta is None:
                    continue
                if id(meta) not in allocated:
                    weight = torch.empty_like(meta, device=device)
                    if weight.dim() == 1 and "norm" in f"{module_name}.{name}":
                        weight.fill_(1.0)
                    else:
                        weight.uniform_(-BOUND, BOUND, generator=generator)
                    allocated[id(meta)] = torch.nn.Parameter(weight, requires_grad=False)
                module._parameters[name] = allocated[id(meta)]
    return hf.to(device).eval()


def random_task(model: circuits.Model, batch: int, length: int, changed: int, seed: int = 0) -> circuits.Task:
    """B random prompts of ``length`` tokens; the corrupted prompt changes the last ``changed`` tokens."""
    vocab = model.hf.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(vocab, (batch, length), generator=generator)
    corrupted = clean.clone()
    changed = min(changed, length)
    shift = torch.randint(1, vocab, (batch, changed), generator=generator)
    corrupted[:, -changed:] = (clean[:, -changed:] + shift) % vocab  # every changed token differs
    answers = torch.randint(vocab, (batch,), generator=generator)
    wrong = (answers + torch.randint(1, vocab, (batch,), generator=generator)) % vocab
    return circuits.Task.from_token_ids(f"random-{length}", clean, corrupted, answers, wrong)


def plain_floor(model: circuits.Model, batch, backward_passes: int) -> None:
    """benchmarks/attribution.py's floor, with the prediction position's logits only: the HF model's body, then its
    head on the last position's hidden state (every prompt here ends at its prediction position), no key/value
    cache. (HF's own ``logits_to_keep=1`` hands the head a strided ``[B, 1, D]`` slice; in bfloat16 on the CPU
    torch then multiplies it by a copy of the head's weight per example, 8 GB for Llama-3.1-8B at B = 8: a cost
    of that path, not of the model.)"""
    body, head = model.hf.get_decoder(), model.hf.get_output_embeddings()

    def logits(**inputs) -> torch.Tensor:
        hidden = body(attention_mask=batch.attention_mask, use_cache=False, **inputs).last_hidden_state
        return head(hidden[:, -1].contiguous())

    with torch.no_grad():
        logits(input_ids=batch.clean_ids)
        logits(input_ids=batch.corrupted_ids)
    for _ in range(backward_passes):
        embeddings = model.hf.get_input_embeddings()(batch.clean_ids).detach().requires_grad_(True)
        torch.autograd.grad(metric_values("logit_diff", logits(inputs_embeds=embeddings), batch).sum(), embeddings)


def cases(model: circuits.Model, method: str, batch: int, length: int, changed: int, ig_steps: int) -> dict:
    """The two calls of a row: ours and the floor, on the same batch."""
    task = random_task(model, batch, length, changed)
    tokenized = task.check(model).to(model.device)
    passes = ig_steps if method.startswith("eap-ig") else 1
    ours = partial(circuits.attribute, model, task, method, batch_size=batch, ig_steps=ig_steps, progress=False)
    return {"ours": ours, "floor": partial(plain_floor, model, tokenized, passes)}


def measure(fn, device: torch.device) -> tuple[float, int]:
    """Median seconds and median peak memory (above what is held before each call) of ``fn``'s calls, repeated
    while the calls so far took less than MIN_SECONDS (a small case's peak of a few MiB varies by as much from
    one call to the next)."""
    seconds: list[float] = []
    peaks: list[int] = []

    def timed() -> None:
        seconds.append(timed_call(fn, device))

    while not seconds or (sum(seconds) < MIN_SECONDS and len(seconds) < REPEATS):
        peaks.append(peak_memory(timed, device))
    return statistics.median(seconds), int(statistics.median(peaks))


def out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text


def refuse_halving() -> None:
    """Make a batch that runs out of memory fail the row: the engine would retry it with half as many examples
    (``circuits.batching``), and the row would measure another batch size than its B."""
    try:
        from circuits.batching import BatchPlan
    except ImportError:  # an engine without retries
        return

    def halve(plan, everything: bool = False) -> None:
        raise MemoryError(f"out of memory in a batch of {plan.size or plan.requested} examples (not retried here)")

    BatchPlan.halve = halve


def limit_memory(gib: float | None) -> float:
    """Cap this process's address space at what it holds now plus ``gib`` (default: the memory available now,
    less a margin for the machine's other work: 2 GiB or a tenth of the memory, the larger), so that an
    allocation past it fails here, cleanly, instead of starving the machine. (Other work that grows meanwhile
    can still leave too little: then the kernel's OOM killer ends the child, and its row says so.)"""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available, total = (int(meminfo[field].split()[0]) * 1024 for field in ("MemAvailable", "MemTotal"))
    budget = available - max(2 * 2**30, total // 10) if gib is None else int(gib * 2**30)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    held = int(status["VmSize"].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (held + budget, resource.RLIM_INFINITY))
    return budget / 2**30


def worker(args: argparse.Namespace) -> None:
    shape, device = SHAPES[args.worker], torch.device(args.device)
    say = partial(print, f"[{shape.name}]", file=sys.stderr, flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and args.memory_limit != 0:
        say(f"memory limit: {limit_memory(args.memory_limit):.1f} GiB above what the process holds")
    start = time.perf_counter()
    hf = skeleton(shape)
    graph = circuits.Graph(shape.layers, shape.heads, shape.kv_heads)
    params = sum(p.numel() for p in hf.parameters())
    facts = {
        "shape": shape.name,
        "params": params,
        "edges": len(graph),
        "n_src": graph.n_src,
        "n_dst": graph.n_dst,
        "dtype": str(shape.dtype).removeprefix("torch."),
        "device": device.type,
        "weight_bytes": sum(t.numel() * t.element_size() for t in (*hf.parameters(), *hf.buffers())),
        "B": args.batch_size,
        "changed": args.changed,
        "threads": torch.get_num_threads(),
    }
    try:
        hf = allocate(hf, device)
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        say(f"out of memory while building the model: {str(error).splitlines()[0][:200]}")
        for item in args.cases:
            method, length = item.split("@")
            row = {**facts, "method": method, "T": int(length), "ig_steps": args.ig_steps if method != "eap" else ""}
            row.update(status="out of memory (weights)", load=os.getloadavg()[0], date=date.today().isoformat())
            print(json.dumps(row), flush=True)
        return
    model = circuits.Model.from_hf(hf, name=shape.name)
    assert len(model.graph) == facts["edges"], "the shape's graph is the model's"
    say(f"built in {time.perf_counter() - start:.0f} s: {params / 1e9:.2f} B parameters, {shape.dtype}, {model.graph}")
    refuse_halving()
    rows = [(method, int(length)) for method, length in (item.split("@") for item in args.cases)]
    for method in dict.fromkeys(method for method, _ in rows):
        for fn in cases(model, method, args.batch_size, WARM_UP_LENGTH, args.changed, args.ig_steps).values():
            fn()  # one-time costs (first calls of kernels, lazily built graph facts) belong to no row
    for method, length in rows:
        row = {**facts, "method": method, "T": length, "ig_steps": args.ig_steps if method != "eap" else ""}
        say(f"{method} T={length} ...")
        try:
            measured = {
                name: measure(fn, device)
                for name, fn in cases(model, method, args.batch_size, length, args.changed, args.ig_steps).items()
            }
        except (MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            gc.collect()
            say(f"{method} T={length}: out of memory ({str(error).splitlines()[0][:160]})")
            row["status"] = "out of memory"
        else:
            (seconds, peak), (floor_seconds, floor_peak) = measured["ours"], measured["floor"]
            row.update(
                seconds=seconds,
                floor_seconds=floor_seconds,
                time_ratio=seconds / floor_seconds,
                peak_bytes=peak,
                floor_peak_bytes=floor_peak,
                memory_ratio=peak / max(floor_peak, 1),
                status="ok",
            )
        row.update(load=os.getloadavg()[0], date=date.today().isoformat())
        print(json.dumps(row), flush=True)
        gc.collect()


# --- the parent: the table, the figure, the README ----------------------------------------------------------


def key(row: dict) -> tuple[str, ...]:
    return tuple(str(row.get(k, "")) for k in KEY)


def read_rows(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    with path.open(newline="") as stream:
        rows = [{"changed": str(CHANGED), **row} for row in csv.DictReader(stream)]  # rows from before the column
    return {key(row): row for row in rows}


def write_rows(path: Path, rows: dict[tuple, dict]) -> None:
    order = {name: i for i, name in enumerate(SHAPES)}
    ordered = sorted(
        rows.values(),
        key=lambda r: (order.get(r["shape"], len(order)), r["shape"], int(r["B"]), int(r["T"]), r["method"]),
    )
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    atomic_write_text(path, text.getvalue())


def run_shape(shape: Shape, pending: list[tuple[str, int]], args: argparse.Namespace, rows: dict) -> None:
    """Measure ``pending`` rows of one shape in a child process, recording each row as it arrives."""
    command = [sys.executable, __file__, "--worker", shape.name, "--batch-size", str(args.batch_size)]
    command += ["--ig-steps", str(args.ig_steps), "--changed", str(args.changed), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.memory_limit is not None:
        command += ["--memory-limit", str(args.memory_limit)]
    command += ["--cases", *[f"{method}@{length}" for method, length in pending]]
    env = {**os.environ, **MEMORY_ENV}
    done = 0
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            if not line.startswith("{"):
                print(line, end="")
                continue
            record(json.loads(line), rows, args)
            done += 1
    if child.returncode == -signal.SIGKILL and done < len(pending):  # the kernel's OOM killer, as a rule
        method, length = pending[done]
        status = "killed (SIGKILL: out of memory on the machine?)"
        record(
            {**plain_row(shape, method, length, args), "status": status, "date": date.today().isoformat()}, rows, args
        )
        done += 1
    if child.returncode:
        print(f"[{shape.name}] the child process exited with status {child.returncode}", flush=True)
    if done < len(pending):
        print(f"[{shape.name}] {len(pending) - done} row(s) not measured (a rerun measures them)", flush=True)


def plain_row(shape: Shape, method: str, length: int, args: argparse.Namespace) -> dict:
    """What identifies a row, and the shape's dtype."""
    return {
        "shape": shape.name,
        "method": method,
        "ig_steps": args.ig_steps if method != "eap" else "",
        "B": args.batch_size,
        "T": length,
        "changed": args.changed,
        "device": torch.device(args.device).type,
        "dtype": str(shape.dtype).removeprefix("torch."),
    }


def record(row: dict, rows: dict, args: argparse.Namespace) -> None:
    rows[key(row)] = row
    write_rows(args.out / "scale.csv", rows)
    print(describe(row), flush=True)


def describe(row: dict) -> str:
    head = f"{row['shape']:14s} {row['method']:14s} B={row['B']} T={row['T']:<4}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}"
    return (
        f"{head} ours {float(row['seconds']):8.2f} s  floor {float(row['floor_seconds']):8.2f} s  "
        f"x{float(row['time_ratio']):5.2f} | peak {mib(row['peak_bytes'])} MiB  floor {mib(row['floor_peak_bytes'])} "
        f"MiB  x{float(row['memory_ratio']):5.2f}"
    )


def mib(value) -> str:
    return f"{float(value) / 2**20:,.0f}"


def size(params) -> str:
    params = int(params)
    return f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.0f} M"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    from circuits.plot import save_figure

    done = [r for r in rows if r.get("status") == "ok"]
    changed = statistics.mode([r["changed"] for r in done]) if done else str(CHANGED)
    done = [r for r in done if r["changed"] == changed]  # one corruption: the rows compare
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
    shape_colors = {name: f"C{i + 2}" for i, name in enumerate(SHAPES)}
    styles = {method: style for method, style in zip(METHODS, ("-", "--"), strict=True)}
    markers = dict(zip(sorted({int(r["T"]) for r in done}), "osD^v<>", strict=False))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (("memory_ratio", "peak memory / floor's"), ("time_ratio", "seconds / floor's"))
    for (by_size, by_length), (column, label) in zip(axes, panels, strict=True):
        for method in METHODS:
            for length, marker in markers.items():
                points = sorted(
                    (int(r["params"]), float(r[column]))
                    for r in done
                    if r["method"] == method and int(r["T"]) == length and r["dtype"] == "float32"
                )
                if points:
                    by_size.plot(
                        *zip(*points, strict=True), marker=marker, color=colors[method], label=f"{method}, T={length}"
                    )
            for r in done:  # the reduced-precision shapes: single points
                if r["method"] == method and r["dtype"] != "float32":
                    point = f"{method}, {r['shape']} {r['dtype']}, T={r['T']}"
                    by_size.plot(
                        int(r["params"]),
                        float(r[column]),
                        marker="*",
                        markersize=12,
                        linestyle="none",
                        color=colors[method],
                        label=point,
                    )
            for name in SHAPES:
                points = sorted(
                    (int(r["T"]), float(r[column])) for r in done if r["method"] == method and r["shape"] == name
                )
                if len(points) > 1:
                    by_length.plot(
                        *zip(*points, strict=True),
                        marker="o",
                        linestyle=styles[method],
                        color=shape_colors[name],
                        label=f"{name}, {method}",
                    )
        by_size.set_xscale("log")
        by_size.xaxis.set_major_locator(FixedLocator([1e8, 3e8, 1e9, 3e9, 1e10]))
        by_size.xaxis.set_major_formatter(FuncFormatter(lambda value, _: size(value)))
        by_size.xaxis.set_minor_formatter(NullFormatter())  # unlabelled minor ticks: labels there overlap
        by_size.set_xlabel("parameters")
        by_length.set_xscale("log", base=2)
        by_length.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        by_length.set_xlabel("prompt length T")
        for ax in (by_size, by_length):
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, frameon=False)
    batches = sorted({r["B"] for r in done})
    fig.suptitle(
        f"circuits.attribute against the plain HF floor (B = {', '.join(batches)}, the last {changed} tokens "
        "corrupted; ratio 1 = the floor)"
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    memory = ""
    if Path("/proc/meminfo").exists():
        total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
        memory = f", {total / 2**30:.0f} GiB memory"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} CPU cores{memory}{gpu}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def commit() -> str:
    """The checkout's commit, marked when the working tree differs from it (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def options(rows: list[dict]) -> str:
    """The command-line options that reproduce ``rows`` (those all rows share)."""
    found = []
    for option, column in (
        ("--batch-size", "B"),
        ("--ig-steps", "ig_steps"),
        ("--changed", "changed"),
        ("--threads", "threads"),
    ):
        values = sorted({str(r.get(column) or "") for r in rows} - {""})
        if len(values) == 1:
            found.append(f"{option} {values[0]}")
    return " ".join(found)


def readme(rows: list[dict]) -> str:
    lines = [
        "# Attribution at scale",
        "",
        "Written by `benchmarks/scale.py` (do not edit by hand). Random-weight models with the shapes of published",
        "models, one batch of B random prompts of T tokens, `logit_diff` on random answers, patching ablation;",
        "EAP-IG is `eap-ig-inputs` with the `ig_steps` shown.",
        "",
        "- **changed**: the corrupted prompt differs from the clean one in its last `changed` tokens. In a causal",
        "  model no source output differs before the first changed position, and the engine can leave those",
        "  positions out of its deltas and gradients: few changed tokens is its best case, `changed` = T the worst.",
        "- **seconds**: `circuits.attribute` on the batch (with its corrupted run); **floor**: the plain HF model on",
        "  the same batch in the same process: 2 no-grad forwards + 1 forward/backward (EAP) or ig_steps of them",
        "  (EAP-IG), gradients to the input embeddings only, the prediction position's logits only (the model's",
        "  body, then its head on the last hidden state). The ratio",
        "  ours / floor is the figure to compare across machines; the seconds depend on the machine and its load",
        "  (**load**: the 1-minute load average after the row; above the number of cores, other work shared them).",
        "- **peak**: the most memory a call held above what was held before it (the weights: **weights**; the median",
        "  over the calls when a short case is repeated), CPU:",
        "  the peak resident set, in a child process per shape whose allocator returns freed tensors at once",
        "  (`benchmarks/_measure.py`); CUDA: the allocator's peak.",
        "- **edges**: `len(model.graph)`; the score buffer is `[n_src, n_dst]` float32 on the CPU.",
        "- *out of memory*: the row needed more than was available to the child process (its address space is",
        "  capped at what was free when it started).",
        "",
        "Reproduce (a rerun skips the rows already in `scale.csv`; `--force` measures them again):",
        "",
        "```",
        f".venv/bin/python benchmarks/scale.py {options(rows)}".rstrip(),
        "```",
        "",
        f"Machine: {machine()}.  ",
        f"Code: commit {commit()}.  ",
        f"Measured: {', '.join(sorted({r.get('date', '') for r in rows if r.get('date')})) or '-'}.",
        "",
        "![memory and time ratios](scale.png)",
        "",
        "| shape | params | dtype | edges | method | B | T | changed | seconds | floor s | time ratio | peak MiB "
        "| floor peak MiB | memory ratio | weights MiB | threads | load |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        method = r["method"] + (f" ({r['ig_steps']} steps)" if r.get("ig_steps") else "")
        head = f"| {r['shape']} | {size(r['params']) if r.get('params') else '-'} | {r['dtype']} | "
        head += f"{int(r['edges']):,} | " if r.get("edges") else "- | "
        head += f"{method} | {r['B']} | {r['T']} | {r.get('changed') or CHANGED} | "
        weights = mib(r["weight_bytes"]) if r.get("weight_bytes") else "-"
        load = f"{float(r['load']):.1f}" if r.get("load") else "-"
        tail = f"{weights} | {r.get('threads') or '-'} | {load} |"
        if r.get("status") != "ok":
            lines.append(f"{head}*{r.get('status')}* | | | | | | {tail}")
            continue
        lines.append(
            f"{head}{float(r['seconds']):.2f} | {float(r['floor_seconds']):.2f} | {float(r['time_ratio']):.2f} | "
            f"{mib(r['peak_bytes'])} | {mib(r['floor_peak_bytes'])} | {float(r['memory_ratio']):.2f} | "
            f"{tail}"
        )
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> None:
    rows = read_rows(args.out / "scale.csv")
    if not rows:
        print(f"no rows in {args.out / 'scale.csv'} yet")
        return
    order = {name: i for i, name in enumerate(SHAPES)}
    ordered = sorted(rows.values(), key=lambda r: (order.get(r["shape"], 99), int(r["B"]), int(r["T"]), r["method"]))
    plot(ordered, args.out / "scale.png")
    atomic_write_text(args.out / "README.md", readme(ordered))
    print(f"wrote {args.out / 'scale.csv'}, {args.out / 'scale.png'}, {args.out / 'README.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        help="prompt lengths T (default: each shape's own grid: "
        f"{', '.join(f'{s.name} {list(s.lengths)}' for s in SHAPES.values() if s.lengths != LENGTHS)}"
        f", the others {list(LENGTHS)})",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: each shape's own (llama-3.1-8b: eap)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--ig-steps", type=int, default=2)
    parser.add_argument(
        "--changed",
        type=int,
        default=CHANGED,
        help="tokens at the end of each prompt that the corruption changes (the engine leaves out the positions "
        "before the first change; T: every position differs, the worst case)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own, one per core); on a "
        "machine shared with other jobs, fewer threads than cores keep the timings stable",
    )
    parser.add_argument(
        "--memory-limit",
        type=float,
        help="GiB a shape's child process may take above what it "
        "holds at its start (default: the memory available then, less 2 GiB or a tenth of the memory; 0: no limit)",
    )
    parser.add_argument("--force", action="store_true", help="measure rows already in the table again")
    parser.add_argument("--report", action="store_true", help="only redraw the figure and README from the table")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.report:
        rows = read_rows(args.out / "scale.csv")
        for name in args.shapes:
            shape = SHAPES[name]
            wanted = [
                (method, length) for length in args.lengths or shape.lengths for method in args.methods or shape.methods
            ]
            pending = [(m, t) for m, t in wanted if args.force or key(plain_row(shape, m, t, args)) not in rows]
            if not pending:
                print(f"[{name}] every row is in the table already (--force measures again)")
                continue
            print(f"[{name}] {len(pending)} row(s): {', '.join(f'{m} T={t}' for m, t in pending)}", flush=True)
            run_shape(shape, pending, args, rows)
    report(args)


if __name__ == "__main__":
    main()
