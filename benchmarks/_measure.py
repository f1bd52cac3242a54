"""Timing and peak-memory helpers shared by the benchmarks (they print figures, never assert them)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from circuits.batching import PeakMemory

# glibc maps every allocation of 64 KiB or more on its own and unmaps it when freed, so that the resident set
# follows live memory: the environment of a process whose CPU peaks are measured
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_memory(fn, device: torch.device) -> int:
    """Bytes of memory one call of ``fn`` needs above what is already held (``circuits.batching.PeakMemory``:
    CUDA, the allocator's peak; CPU on Linux, the peak resident set above the resident set before the call)."""
    gc.collect()
    meter = PeakMemory(device)
    fn()
    peak = meter.bytes()
    if peak is None:
        raise RuntimeError(f"no peak memory can be measured on {device} here")
    return peak


def timed_call(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, waiting for the device's queued work on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(timed_call(fn, device) for _ in range(repeats))


def child_memory(script: str, device_name: str | None, arguments: list[str] = ()) -> dict[str, int]:
    """CPU peaks of every case, from ``script --memory-only [arguments]`` run in a child process.

    There glibc maps every large tensor on its own and unmaps it when freed, so the resident
    set follows live memory. (Timings are taken in the parent, under the default settings.)
    """
    env = {**os.environ, **MEMORY_ENV}
    command = [sys.executable, script, "--memory-only", *arguments] + (["--device", device_name] if device_name else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])
