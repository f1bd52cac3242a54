"""Data-parallel attribution on torch.distributed: seconds by world size, and whether the scores are identical.

Launches itself under torchrun once per world size (``--ranks``, default 1 and 2) on this machine: SmolLM2-135M
(bundled weights) on IOI, EAP and EAP-IG-inputs. Each rank uses its GPU when there are GPUs (NCCL), else
the CPU (gloo) with ``--threads`` torch threads. Rank 0 reports the seconds of each method (model loading
excluded) and the scores; the table gives the speed-up over one rank and the largest difference of the
scores from one rank's. On a CPU of 2 cores two ranks share the cores one rank had: the figure shows the
overhead of the exchange, not a speed-up.

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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--rank-work", "--out", str(out)]
    command += ["--n", str(args.n), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    from safetensors.torch import load_file

    return {**json.loads((out / "seconds.json").read_text()), "scores": load_file(out / "scores.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank on the CPU")
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
    setting = f"n={args.n}, batch size {args.batch_size}, {args.threads} thread(s) per rank, {base['device']}"
    print(f"\nSmolLM2-135M IOI, {setting}")
    versus = f"max |diff| vs {args.ranks[0]} rank(s)"
    print(f"{'ranks':>5s} {'method':15s} {'seconds':>8s} {'speed-up':>8s} {versus:>24s}")
    for ranks, run in runs.items():
        for method in METHODS:
            diff = float((run["scores"][method] - base["scores"][method]).abs().nan_to_num().max())
            speedup = base["seconds"][method] / run["seconds"][method]
            print(f"{ranks:5d} {method:15s} {run['seconds'][method]:8.2f} {speedup:8.2f} {diff:24.3g}")


if __name__ == "__main__":
    main()
