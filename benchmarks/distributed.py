"""Data-parallel attribution on torch.distributed: seconds by world size, and whether the scores are identical.

Launches itself under torchrun once per world size (``--ranks``, default 1 and 2) on this machine: SmolLM2-135M
(bundled weights) on IOI, EAP and EAP-IG-inputs. Each rank uses its GPU when there are GPUs (NCCL), else
the CPU (gloo) with ``--threads`` torch threads (default: the machine's cores shared out among the ranks,
so that every world size has the same cores). Rank 0 reports the seconds of each method (model loading
excluded) and the scores; the table gives the speed-up over the first world size and the largest
difference of the scores from its. That difference is 0 when every rank runs as many threads as the
first world size's ranks (``--threads 1``); another thread count changes the order of the float sums
inside the matrix products. On a 2-core CPU the default compares one rank of two threads with two ranks
of one thread on the same cores: it shows the cost of splitting the work, not a speed-up from hardware.

    .venv/bin/python benchmarks/distributed.py [--n 128] [--batch-size 16] [--ranks 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("eap", "eap-ig-inputs")


def rank_main(args) -> None:
    """One rank's work (under torchrun): time each method, rank 0 saves the scores and the seconds."""
    import circuits
    from circuits import distributed, tasks

    device = distributed.init()
    torch.set_num_threads(args.threads)
    model = circuits.load_model("smollm2-135m", device=device)
    task = tasks.get("ioi", model.tokenizer, n=args.n, seed=0)
    circuits.attribute(model, task, "eap", batch_size=args.batch_size, progress=False)  # warm-up
    seconds, scores = {}, {}
    for method in METHODS:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores[method] = circuits.attribute(model, task, method, batch_size=args.batch_size, progress=False).tensor
        seconds[method] = time.perf_counter() - start
    if distributed.is_main():
        from safetensors.torch import save_file

        save_file(scores, Path(args.out) / "scores.safetensors")
        (Path(args.out) / "seconds.json").write_text(json.dumps({"seconds": seconds, "device": str(device)}))


def launch(ranks: int, args, out: Path) -> dict:
    threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--rank-work", "--out", str(out)]
    command += ["--examples", str(args.n), "--batch-size", str(args.batch_size), "--threads", str(threads)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    from safetensors.torch import load_file

    saved = json.loads((out / "seconds.json").read_text())
    return {**saved, "threads": threads, "scores": load_file(out / "scores.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", "--examples", dest="n", type=int, default=128)  # torchrun takes --n for its own
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per rank on the CPU (default: the cores shared out)"
    )
    parser.add_argument("--rank-work", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_work:
        rank_main(args)
        return
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for ranks in args.ranks:
            out = Path(folder) / str(ranks)
            out.mkdir()
            runs[ranks] = launch(ranks, args, out)
    base = runs[args.ranks[0]]
    print(f"\nSmolLM2-135M IOI, n={args.n}, batch size {args.batch_size}, {base['device']}, {os.cpu_count()} cores")
    versus = f"max |diff| / max |score| vs {args.ranks[0]}"
    print(f"{'ranks':>5s} {'threads':>7s} {'method':15s} {'seconds':>8s} {'speed-up':>8s} {versus:>28s}")
    for ranks, run in runs.items():
        for method in METHODS:
            reference = base["scores"][method].nan_to_num()
            diff = float((run["scores"][method].nan_to_num() - reference).abs().max() / reference.abs().max())
            speedup = base["seconds"][method] / run["seconds"][method]
            seconds = run["seconds"][method]
            print(f"{ranks:5d} {run['threads']:7d} {method:15s} {seconds:8.2f} {speedup:8.2f} {diff:28.3g}")


if __name__ == "__main__":
    main()
