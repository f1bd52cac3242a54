"""Data-parallel discovery on torch.distributed: which rank computes what, and how every rank ends equal.

When a process group is initialised (launched by ``torchrun``, or ``init()``), every computation over a
task's batches splits them across the ranks: in each round of ``world_size`` consecutive batches, rank r
computes batch ``round_start + r`` (a probe batch of ``batch_size="auto"`` is computed by every rank, each
measuring its own memory, and the smallest batch size wins). The results are then exchanged (``exchange``):
every rank receives every batch's result and sums them in batch order, the same float operations in the
same order as one process runs, so scores, metrics and ACDC's decisions are bit-identical whatever the world
size. Exact patching splits its ablation units instead of batches: each score is computed whole by one rank
and the others add exact zeros to it (``sum_owned``).

Only all-reduces carry data (no pickled objects), on the CPU for gloo and on this rank's GPU for NCCL. A
failure on one rank (bad input, an exception, an out-of-memory error) is part of the exchange: every rank
raises it at the same batch (an out-of-memory error as a ``MemoryError``, which halves the batch on every
rank alike), so no rank waits for a result that will never come. A rank that dies outright is ended by
``torchrun``; the process group's timeout bounds every wait otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch

from .errors import CircuitsError

HEADER = 10  # per slot: status, number of dimensions, up to 8 sizes
MESSAGE = 400  # characters of a failure's message carried to the other ranks
OK, OUT_OF_MEMORY, FAILED = 1, 2, 3
DEFAULT_TIMEOUT_S = 1800.0


class RankFailure(CircuitsError):
    """Another rank failed: this rank stops too (rank 0 reports it)."""


class RankOutOfMemory(MemoryError):
    """Another rank ran out of memory: every rank halves the failed batch alike."""


def active() -> bool:
    """Is a process group of more than one rank initialised?"""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return rank() == 0


def owns(index: int) -> bool:
    """Is unit or batch ``index`` this rank's (``index`` mod world size)?"""
    return index % world_size() == rank()


def launched() -> bool:
    """Was this process started by torchrun (or another launcher setting its environment) with several ranks?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, timeout_s: float | None = None) -> torch.device:
    """Join the process group torchrun describes in the environment (once) and return this rank's device:
    ``cuda:LOCAL_RANK`` when GPUs are present (NCCL), else the CPU (gloo). Outside torchrun, a single process:
    the default device (CUDA when available). ``timeout_s`` bounds every wait for another rank (default
    ``CIRCUITS_DIST_TIMEOUT`` seconds, else 30 minutes)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise CircuitsError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # not launched by torchrun: one process on the default device
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise CircuitsError(
                f"circuits.distributed.init() needs torchrun's environment; {', '.join(missing)} is not set "
                "(launch with torchrun --nproc-per-node N -m circuits ...)"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        seconds = (
            timeout_s if timeout_s is not None else float(os.environ.get("CIRCUITS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        )
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    return device()


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    moved = tensor.to(device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return moved.to(tensor.device)


def agree_min(value: int) -> int:
    """The smallest of every rank's ``value`` (all ranks call it together)."""
    if not active():
        return value
    return int(-_all_reduce(torch.tensor([-value], dtype=torch.int64), "max")[0])


def exchange(own: Callable[[], torch.Tensor] | None, slot: int, n_slots: int, what: Callable[[int], str]) -> list:
    """Every rank's result of one round, on every rank: ``own()`` is this rank's (in ``slot``; None when it has
    none this round). A result travels as float64 (exact for float32, float16, bfloat16 and bools) and comes
    back in float64: callers convert it to their dtype. If ``own()`` raises on any rank, every rank raises at
    the first failed slot (``what(slot)`` names it): a ``MemoryError`` for an out-of-memory error, else a
    ``CircuitsError`` with the failing rank's message; the failing rank re-raises its own exception."""
    from .batching import is_out_of_memory

    header = torch.zeros(n_slots, HEADER, dtype=torch.int64)
    result, error = None, None
    if own is not None:
        try:
            result = own().detach().cpu()
            if result.dim() > HEADER - 2:
                raise CircuitsError(f"a result of {result.dim()} dimensions cannot be exchanged")
            header[slot, :2] = torch.tensor([OK, result.dim()])
            header[slot, 2 : 2 + result.dim()] = torch.tensor(result.shape, dtype=torch.int64)
        except Exception as caught:  # shared with the other ranks below, then re-raised here
            error = caught
            header[slot, 0] = OUT_OF_MEMORY if is_out_of_memory(caught) else FAILED
    header = _all_reduce(header)
    failed = [index for index in range(n_slots) if header[index, 0] in (OUT_OF_MEMORY, FAILED)]
    if failed:
        _raise_failure(failed[0], header[failed[0], 0], error if slot == failed[0] else None, slot, n_slots, what)
    shapes = [
        header[index, 2 : 2 + header[index, 1]].tolist() if header[index, 0] else None for index in range(n_slots)
    ]
    sizes = [0 if shape is None else int(torch.Size(shape).numel()) for shape in shapes]
    offsets = [sum(sizes[:index]) for index in range(n_slots)]
    flat = torch.zeros(sum(sizes), dtype=torch.float64)
    if result is not None:
        flat[offsets[slot] : offsets[slot] + sizes[slot]] = result.flatten().to(torch.float64)
    flat = _all_reduce(flat)
    return [
        None if shape is None else flat[offset : offset + size].view(shape)
        for shape, offset, size in zip(shapes, offsets, sizes, strict=True)
    ]


def _raise_failure(failed: int, status: int, error: BaseException | None, slot: int, n_slots: int, what) -> None:
    """Every rank raises the failure of ``slot`` ``failed``: its own exception on the rank that had it."""
    codes = torch.zeros(n_slots, MESSAGE, dtype=torch.int64)
    if error is not None:
        text = (str(error).splitlines() or [type(error).__name__])[0][:MESSAGE]
        codes[slot, : len(text)] = torch.tensor([ord(c) for c in text], dtype=torch.int64)
    codes = _all_reduce(codes)
    where = f"rank {failed} failed in {what(failed)}"  # on every rank: ``what`` may record where it failed
    if error is not None:
        raise error
    message = "".join(chr(int(c)) for c in codes[failed] if c)
    if status == OUT_OF_MEMORY:
        raise RankOutOfMemory(f"{where}: out of memory ({message})")
    raise RankFailure(f"{where}: {message}")


def sum_owned(compute: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
    """The sum over ranks of ``compute()``, each rank's tensor holding the entries it owns and zeros elsewhere,
    so that every entry arrives exactly as its owner computed it. A failure on any rank raises on every rank."""
    if not active():
        return compute()
    n = world_size()
    shared = exchange(compute, rank(), n, lambda slot: f"{what} (rank {slot}'s share)")
    total = shared[0]
    for part in shared[1:]:
        total = total + part
    return total


def from_main(read: Callable[[], bytes | None], what: str) -> bytes | None:
    """``read()`` on rank 0, its bytes (or None) on every rank: one reading of a file that other ranks may not
    see (a checkpoint on rank 0's disk). A failure to read raises on every rank."""
    if not active():
        return read()

    def encoded() -> torch.Tensor:
        data = read()
        if data is None:
            return torch.zeros(0, 0)  # two dimensions: no file, as distinct from an empty one
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)

    shared = exchange(encoded if is_main() else None, rank(), world_size(), lambda slot: f"reading {what}")[0]
    return None if shared.dim() == 2 else shared.to(torch.uint8).numpy().tobytes()


def on_main(work: Callable[[], None], what: str) -> None:
    """``work()`` on rank 0 only (a check or a write of rank 0's files); a failure raises on every rank."""
    from_main(work, what)  # work returns None: nothing to send, only its failure
