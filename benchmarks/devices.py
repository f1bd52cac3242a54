"""Models larger than one device: EAP on a random-weight model of a real shape, spread with accelerate.

Each variant runs where the machine has what it needs, else prints SKIP and why:

- ``gpus``: split over every visible GPU with ``device_map="auto"`` (``max_memory`` caps each GPU near its
  share, so that the layers really spread), checked against the model on GPU 0 alone when it fits there;
- ``cpu-offload``: GPU 0 holds part of the layers, the rest are offloaded to the CPU (loaded onto GPU 0 for
  their layer only), checked against the model on GPU 0 alone when it fits there;
- ``disk``: on the CPU with most layers offloaded to disk (``device_map="auto"``, ``max_memory`` on the CPU
  below the model's size), checked against the model in memory on the CPU. Runs anywhere.

Per variant it prints where the layers went, seconds (load; EAP on the task, after a small warm-up) for the
spread model and the one-device reference, peak memory per device during EAP (CUDA: the allocator's peak on
each GPU; CPU: the peak resident set above the level before the call, file-backed pages of memory-mapped
weights included) and the weights resident per device, and the largest score difference against the
reference, relative to the largest score. Exit status 1 when a check fails.

    .venv/bin/python benchmarks/devices.py [--shape smollm2-135m] [--variants disk cpu-offload gpus]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import circuits

SHAPES = {  # real models' shapes (Llama architecture), random weights
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "smollm2-360m": dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ["disk", "cpu-offload", "gpus"]
GIB = 2**30


def save_random_model(shape: str, dtype: torch.dtype, folder: Path) -> int:
    """A random-weight model of ``shape`` saved to ``folder`` (once); returns its weights' size in bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048)
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def make_task(vocab: int, n: int, seq: int) -> circuits.Task:
    """Random prompts; each corrupted prompt differs from its clean one in a third of its positions."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (n, seq), generator=generator)
    corrupted = clean.clone()
    for row in corrupted:
        positions = torch.randperm(seq, generator=generator)[: seq // 3]
        row[positions] = torch.randint(0, vocab, (len(positions),), generator=generator)
    answers = torch.randint(0, vocab, (n,), generator=generator).tolist()
    wrong = torch.randint(0, vocab, (n,), generator=generator).tolist()
    return circuits.Task.from_token_ids("random", clean.tolist(), corrupted.tolist(), answers, wrong)


def cpu_resident_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field))
    except (OSError, StopIteration):
        return None


def measured(fn):
    """``fn()``'s result, seconds, and peak memory per device above the level before the call (bytes)."""
    gc.collect()
    gpus = range(torch.cuda.device_count())
    before = {}
    for i in gpus:
        torch.cuda.synchronize(i)
        torch.cuda.reset_peak_memory_stats(i)
        before[f"cuda:{i}"] = torch.cuda.memory_allocated(i)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak resident set (VmHWM) to the current one
    except OSError:
        pass
    rss = cpu_resident_kib("VmRSS:")
    start = time.perf_counter()
    result = fn()
    for i in gpus:
        torch.cuda.synchronize(i)
    seconds = time.perf_counter() - start
    peaks = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) - before[f"cuda:{i}"] for i in gpus}
    hwm = cpu_resident_kib("VmHWM:")
    if rss is not None and hwm is not None:
        peaks["cpu"] = (hwm - rss) * 1024
    return result, seconds, peaks


def weights_per_device(model: circuits.Model) -> dict[str, int]:
    """Bytes of the weights resident on each device (offloaded ones are on the meta device: not counted)."""
    sizes = Counter()
    for tensor in [*model.hf.parameters(), *model.hf.buffers()]:
        if tensor.device.type != "meta":
            sizes[str(tensor.device)] += tensor.numel() * tensor.element_size()
    return dict(sizes)


def layers_per_device(model: circuits.Model) -> dict[str, int]:
    device_map = getattr(model.hf, "hf_device_map", None) or {}
    counts = Counter()
    for layer in range(model.adapter.n_layers):
        block = model.adapter.layer_module(layer)
        name = next(n for n, m in model.hf.named_modules() if m is block)
        place = next((device_map[k] for k in sorted(device_map, key=len, reverse=True) if name.startswith(k)), None)
        counts[str(place)] += 1
    return dict(counts)


def eap(model: circuits.Model, task: circuits.Task, batch_size: int, warm_up: circuits.Task):
    circuits.attribute(model, warm_up, "eap", batch_size=batch_size, progress=False)
    return measured(lambda: circuits.attribute(model, task, "eap", batch_size=batch_size, progress=False).tensor)


def fmt_bytes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{device} {size / GIB:.2f} GiB" for device, size in sorted(sizes.items())) or "-"


def run_variant(name: str, args, folder: Path, size: int, task, warm_up) -> dict:
    gpus = torch.cuda.device_count()
    if name in ("cpu-offload", "gpus") and gpus < (2 if name == "gpus" else 1):
        need = "two or more GPUs" if name == "gpus" else "a GPU"
        print(f"SKIP {name}: {gpus} GPU(s) visible; needs {need}")
        return {"variant": name, "skipped": f"{gpus} GPU(s) visible"}
    dtype = DTYPES[args.dtype]
    budget = int(size * args.fraction)
    offload = Path(tempfile.mkdtemp(prefix="circuits-offload-"))
    if name == "disk":
        reference_device, placement = "cpu", dict(max_memory={"cpu": budget}, offload_folder=offload)
    elif name == "cpu-offload":
        reference_device, placement = "cuda:0", dict(max_memory={0: budget, "cpu": 4 * size})
    else:
        share = int(size / gpus * 1.15) + GIB // 4  # each GPU near its share (room for one layer and activations)
        reference_device, placement = "cuda:0", dict(max_memory={i: share for i in range(gpus)})
    reference = None
    fits = reference_device == "cpu" or size < 0.7 * torch.cuda.mem_get_info(0)[0]
    if fits:
        model, load_seconds, _ = measured(lambda: circuits.load_model(str(folder), reference_device, dtype))
        reference, ref_seconds, ref_peaks = eap(model, task, args.batch_size, warm_up)
        reference = reference.cpu()
        print(f"{name}: reference on {reference_device}: load {load_seconds:.1f} s, EAP {ref_seconds:.2f} s, "
              f"peak {fmt_bytes(ref_peaks)}")  # fmt: skip
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        ref_seconds = None
        print(f"{name}: the model ({size / GIB:.1f} GiB) does not fit on {reference_device}: no reference")
    model, load_seconds, _ = measured(
        lambda: circuits.load_model(str(folder), dtype=dtype, device_map="auto", **placement)
    )
    scores, seconds, peaks = eap(model, task, args.batch_size, warm_up)
    row = {
        "variant": name,
        "model": repr(model),
        "layers": layers_per_device(model),
        "weights resident": weights_per_device(model),
        "load s": round(load_seconds, 2),
        "eap s": round(seconds, 3),
        "reference eap s": None if ref_seconds is None else round(ref_seconds, 3),
        "peak memory": peaks,
    }
    print(f"{name}: {row['model']}")
    print(f"  layers per device: {row['layers']}; weights resident: {fmt_bytes(row['weights resident'])}")
    print(f"  load {load_seconds:.1f} s, EAP {seconds:.2f} s"
          + (f" ({seconds / ref_seconds:.2f} x the reference)" if ref_seconds else ""))  # fmt: skip
    print(f"  peak memory during EAP: {fmt_bytes(peaks)}")
    if reference is not None:
        scores = scores.cpu()
        real = ~torch.isnan(reference)
        same_nan = bool((torch.isnan(scores) == ~real).all())
        difference = float((scores[real] - reference[real]).abs().max())
        relative = difference / float(reference[real].abs().max())
        tolerance = args.tolerance if args.tolerance is not None else (1e-5 if dtype == torch.float32 else 2e-2)
        row.update({"max abs diff": difference, "relative": relative, "ok": same_nan and relative <= tolerance})
        verdict = "ok" if row["ok"] else "FAILED"
        print(f"  scores vs reference: max |diff| {difference:.3g} ({relative:.3g} of the largest score; "
              f"tolerance {tolerance:g}): {verdict}")  # fmt: skip
    del model
    gc.collect()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=SHAPES)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--n", type=int, default=8, help="prompts")
    parser.add_argument("--seq", type=int, default=16, help="tokens per prompt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--fraction", type=float, default=0.4, help="disk, cpu-offload: share of the weights kept in memory / on GPU"
    )
    parser.add_argument("--tolerance", type=float, default=None, help="relative (default 1e-5 fp32, 2e-2 bf16/fp16)")
    parser.add_argument("--folder", type=Path, default=None, help="keep the random model here (reused next time)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large CPU tensors mapped on their own: RSS follows live memory
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    torch.backends.cuda.matmul.allow_tf32 = False  # the references compare to a tolerance meant for fp32
    torch.backends.cudnn.allow_tf32 = False
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)  # "parameters on the meta device": meant
    folder = args.folder or Path(tempfile.mkdtemp(prefix=f"circuits-{args.shape}-"))
    folder.mkdir(parents=True, exist_ok=True)
    size = save_random_model(args.shape, DTYPES[args.dtype], folder)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"{args.shape} ({size / GIB:.2f} GiB {args.dtype}) in {folder}; GPUs: {gpus or 'none'}; "
          f"EAP on {args.n} random prompts of {args.seq} tokens, batch {args.batch_size}")  # fmt: skip
    task = make_task(SHAPES[args.shape]["vocab_size"], args.n, args.seq)
    warm_up = task.subset(min(2, args.n))
    rows = [run_variant(name, args, folder, size, task, warm_up) for name in args.variants]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 1 if any(row.get("ok") is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
