"""Batches that fit in memory: ``batch_size="auto"``, memory budgets, and halving a batch that ran out of memory.

Every computation over a task's examples (attribution, exact patching, ACDC, evaluation) walks them in
consecutive batches laid out by a ``BatchPlan``:

- ``batch_size=N``: batches of N examples.
- ``batch_size="auto"``: the first batch holds ``PROBE`` examples and its peak memory is measured (CUDA:
  the allocator's peak; CPU on Linux: the peak resident set, ``/proc/self/clear_refs`` then ``VmHWM``).
  Divided by its tokens (examples x padded length) that is a cost per token; every later batch holds as
  many examples of the task's longest prompt as fit the budget: ``max_memory`` (bytes, or a string such as
  ``"8GiB"`` or ``"500MB"``: memory the batches may use on top of what is held when the computation
  starts), by default ``HEADROOM`` of what the device has free (``torch.cuda.mem_get_info`` plus what
  torch's cache holds unused; on the CPU the available system memory). The probe counts every fixed cost
  as a cost per token, so the estimate errs on the small side. Where no peak can be measured, batches of
  ``FALLBACK`` examples.
- Whatever the size, a batch that runs out of memory (``torch.cuda.OutOfMemoryError``, ``MemoryError``, or a
  RuntimeError saying an allocation failed) is retried with half as many examples, and so are the batches
  after it; one line on stderr says so. A batch of one example that does not fit is a CircuitsError.

Scores and metrics are sums over examples, so every layout gives the same result up to float rounding. A
resumable checkpoint (``circuits.resume``) fingerprints the batch size asked for (a number or "auto") and
``PlannedCheckpoint`` records the layout actually used (each batch's size, the size of the next ones, the
halvings and, for ``mean`` ablation, the mean itself) in it: a resumed run replays the same batches and
sums the same numbers in the same order, so it gives the identical result.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar

import torch

from . import distributed
from .errors import CircuitsError

AUTO = "auto"
PROBE = 4  # examples in the first batch of an automatic plan, whose peak memory sizes the others
HEADROOM = 0.9  # share of the device's free memory that an automatic plan budgets for its batches
FALLBACK = 32  # examples per batch of an automatic plan where no peak memory can be measured
BatchSize = int | Literal["auto"]
T = TypeVar("T")

UNIT_NAMES = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")  # case does not matter
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
UNITS["tib"] = 2**40
OUT_OF_MEMORY_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "could not allocate")


def check_batch_size(value: Any, what: str = "batch_size") -> None:
    """A CircuitsError unless ``value`` is a positive integer or ``"auto"`` (a ``BatchPlan`` passes too)."""
    if isinstance(value, BatchPlan) or (isinstance(value, str) and value == AUTO):
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CircuitsError(f'{what} must be a positive integer or "auto", got {value!r}')


def parse_memory(value: Any, what: str = "max_memory") -> int | None:
    """Bytes from an integer or a string such as ``"8GiB"``, ``"1.5 GB"``, ``"512MiB"`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]+)\s*", value)
        if match and match[2].lower() in UNITS and float(match[1]) > 0:
            return int(float(match[1]) * UNITS[match[2].lower()])
    raise CircuitsError(
        f"{what} must be a positive number of bytes or a string such as '8GiB' or '500MB' "
        f"(units {', '.join(UNIT_NAMES)}), got {value!r}"
    )


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory plus what torch's cache holds unused; on the CPU the
    available system memory (psutil, else /proc/meminfo's MemAvailable, else free physical pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def is_out_of_memory(error: BaseException) -> bool:
    """Is ``error`` an allocation failure (CUDA out of memory, MemoryError, a CPU allocator's RuntimeError)?"""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OUT_OF_MEMORY_TEXT)


def release_memory(device: torch.device) -> None:
    """Give what a failed batch held back (its tensors are garbage once its traceback is gone)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """The peak memory on ``device`` above what was in use when it was made (``bytes()``; None when it cannot
    be measured). CUDA: the allocator's peak statistics. CPU: the process's peak resident set (Linux), whose
    counter is reset here; a measurement of that counter around this one (a benchmark's) is disturbed."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.start: int | None = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")  # the peak resident set (VmHWM) starts again from the current one
                self.start = _status_bytes("VmRSS:")
            except (OSError, StopIteration, ValueError):
                self.start = None

    def bytes(self) -> int | None:
        if self.start is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.start
        try:
            return _status_bytes("VmHWM:") - self.start
        except (OSError, StopIteration, ValueError):
            return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BatchPlan:
    """The layout of one computation's batches over a task's examples (see the module docstring).

    ``spans(lengths, start)`` yields ``(first example, examples)`` for batch ``start`` onward: the sizes
    recorded so far are replayed, new batches take ``size`` (after the probe of an automatic plan).
    ``halve()`` after an out-of-memory error in the batch last yielded plans it, and every batch after it,
    with half as many examples; ``run`` does that around a resumable computation.
    """

    def __init__(
        self,
        batch_size: BatchSize,
        device: torch.device | str = "cpu",
        max_memory: int | str | None = None,
        log: Callable[[str], None] = _stderr,
    ):
        check_batch_size(batch_size)
        if isinstance(batch_size, BatchPlan):
            raise CircuitsError("a BatchPlan of a BatchPlan: use BatchPlan.of(batch_size) to take a plan as it is")
        self.requested: BatchSize = batch_size
        self.device = torch.device(device)
        self.budget = parse_memory(max_memory)
        self.log = log
        self.size: int | None = None if batch_size == AUTO else batch_size  # None: measure a probe first
        self.sizes: list[int] = []  # every batch laid out so far, in order
        self.halvings = 0
        self.mean: torch.Tensor | None = None  # the ``mean`` ablation values, once computed (kept for retries)
        self.hidden_mean: torch.Tensor | None = None  # the same of the MLPs' hidden units (``mlp-neuron``)
        self.current = -1  # index of the batch last yielded
        self._probe: tuple[PeakMemory, int, int, int] | None = None  # (meter, budget, examples, tokens)
        self._width = 1

    @classmethod
    def of(cls, batch_size: BatchSize | BatchPlan, device: torch.device | str = "cpu", max_memory=None) -> BatchPlan:
        """``batch_size`` itself when it is a plan, else a new plan for it."""
        return batch_size if isinstance(batch_size, BatchPlan) else cls(batch_size, device, max_memory)

    def __repr__(self) -> str:
        return f"BatchPlan({self.requested!r}: sizes {self.sizes}, next {self.size})"

    def sub_plan(self) -> BatchPlan:
        """A fresh plan with the same request and budget (for a pass of another cost, such as the mean's)."""
        plan = BatchPlan(self.requested, self.device, None, self.log)
        plan.budget, plan.halvings = self.budget, self.halvings
        if plan.size is not None:
            plan.size = max(1, plan.size >> self.halvings)
        return plan

    # --- laying out batches -------------------------------------------------------------------------

    def spans(self, lengths: list[int], start: int = 0) -> Iterator[tuple[int, int]]:
        """``(first example, examples)`` of batch ``start`` onward over examples of ``lengths`` tokens (a batch
        is as wide as its longest); the recorded sizes of batches ``start`` onward are replayed first."""
        n = len(lengths)
        self._width = max(lengths, default=1)
        if start > len(self.sizes):
            if self.requested == AUTO or self.halvings:
                raise CircuitsError(f"batch {start} was asked for, but only {len(self.sizes)} batches are laid out")
            self.sizes += [self.requested] * (start - len(self.sizes))  # a fixed size that never halved
        offset = sum(self.sizes[:start])
        index = start
        while offset < n:
            if index < len(self.sizes):
                size = min(self.sizes[index], n - offset)
                self.sizes[index] = size
            else:
                size = min(PROBE if self.size is None else self.size, n - offset)
                self.sizes.append(size)
                if self.size is None:
                    self._start_probe(size, size * max(lengths[offset : offset + size]))
            self.current = index
            yield offset, size
            self.finish()
            offset += size
            index += 1
        del self.sizes[index:]

    def _start_probe(self, examples: int, tokens: int) -> None:
        release_memory(self.device)
        budget = self.budget if self.budget is not None else int(HEADROOM * free_memory(self.device))
        self._probe = (PeakMemory(self.device), budget, examples, tokens)

    @property
    def probing(self) -> bool:
        """Is the batch last yielded an automatic plan's probe (its measurement sizes the batches after it)?"""
        return self._probe is not None

    def finish(self) -> None:
        """The batch last yielded is done: an automatic plan's probe sets the size of the batches after it
        (under torch.distributed, the smallest size any rank measured: every rank lays out the same batches)."""
        if self._probe is None:
            return
        meter, budget, examples, tokens = self._probe
        self._probe = None
        peak = meter.bytes()
        if peak is None:
            size = FALLBACK
        else:
            per_token = max(peak, 1) / tokens
            size = max(1, int(budget // (per_token * self._width)))
        self.size = distributed.agree_min(size)

    def halve(self, everything: bool = False) -> None:
        """After an out-of-memory error in the batch last yielded (``everything``: in any batch laid out),
        lay it and the batches after it (every batch) out anew with half as many examples, saying so on
        stderr; a CircuitsError when that batch held one example."""
        self._probe = None
        index = 0 if everything else max(self.current, 0)
        laid_out = self.sizes[index:] if everything else self.sizes[index : index + 1]
        failed = max(laid_out, default=self.size or PROBE)
        if failed <= 1:
            raise CircuitsError(
                f"out of memory with a batch of one example on {self.device}: the model does not fit one example "
                "of this task; free memory, or use a smaller dtype or more devices"
            )
        self.size = failed // 2
        self.halvings += 1
        del self.sizes[index:]
        if distributed.is_main():  # every rank halves alike; one says so
            self.log(
                f"circuits: out of memory in a batch of {failed} examples on {self.device}; retrying with {self.size}"
            )
        release_memory(self.device)

    # --- recording the layout in a checkpoint -------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The layout as JSON data: the sizes laid out (run-length encoded), the next size, the halvings."""
        runs: list[list[int]] = []
        for size in self.sizes:
            if runs and runs[-1][0] == size:
                runs[-1][1] += 1
            else:
                runs.append([size, 1])
        return {"sizes": runs, "size": self.size, "halvings": self.halvings}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replay the layout ``state()`` recorded; a CircuitsError if it is malformed."""
        try:
            sizes = [int(size) for size, count in state["sizes"] for _ in range(int(count))]
            size = state["size"]
            size = None if size is None else int(size)
            halvings = int(state["halvings"])
            if any(s < 1 for s in sizes) or (size is not None and size < 1) or halvings < 0:
                raise ValueError("a size below 1")
        except (KeyError, TypeError, ValueError) as error:
            raise CircuitsError(f"the batch layout recorded in the checkpoint is unreadable ({error})") from None
        self.sizes, self.size, self.halvings, self._probe = sizes, size, halvings, None

    # --- running a resumable computation ------------------------------------------------------------

    def run(self, compute: Callable[[Any], T], checkpoint: Any = None) -> T:
        """``compute(checkpoint)``, resumed after each out-of-memory error with the failed batch halved.

        ``compute`` must resume from its checkpoint (``circuits.methods.common.resumed_sum``) and save it
        after every batch; without one (None) an in-memory checkpoint serves the retries.
        """
        planned = PlannedCheckpoint(MemoryCheckpoint() if checkpoint is None else checkpoint, self)
        while True:
            try:
                return compute(planned)
            except Exception as error:  # only allocation failures are retried
                if not is_out_of_memory(error):
                    raise
            self.halve()

    def each(self, items: Callable[[int], Iterator[T]], work: Callable[[T], None]) -> None:
        """``work(item)`` for every item of ``items(start)`` (one item per batch, batch ``start`` onward),
        retrying from the failed batch with half as many examples after an out-of-memory error. ``work``
        must keep nothing of a batch that fails (collect its results, then store them)."""
        done = 0
        while True:
            try:
                for item in items(done):
                    work(item)
                    done += 1
                return
            except Exception as error:  # only allocation failures are retried
                if not is_out_of_memory(error):
                    raise
            self.halve()


class MemoryCheckpoint:
    """A checkpoint kept in memory, for resuming after an out-of-memory error when the caller asked for none."""

    path = "(in memory)"

    def __init__(self):
        self.saved = None

    def load(self):
        if self.saved is None:
            return None
        from .resume import Saved

        state, tensors = self.saved
        return Saved({}, dict(state), {name: tensor.clone() for name, tensor in tensors.items()})

    def save(self, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.saved = (dict(state), {name: tensor.detach().clone() for name, tensor in (tensors or {}).items()})


class PlannedCheckpoint:
    """A checkpoint that also records a plan's batch layout (and the ``mean`` ablation values) in every save
    and replays them on load, so that a resumed run lays out and sums its batches as the first run did."""

    STATE_KEY = "batches"
    MEAN_KEY = "ablation_mean"

    def __init__(self, inner: Any, plan: BatchPlan):
        self.inner, self.plan = inner, plan
        self.path = inner.path
        self.loaded = False  # after the first load the plan in memory is the truth (it may have halved since)

    def load(self):
        saved = self.inner.load()
        first, self.loaded = not self.loaded, True
        if saved is not None and first:
            if self.STATE_KEY in saved.state:
                self.plan.restore(saved.state[self.STATE_KEY])
            elif self.plan.requested == AUTO:
                raise CircuitsError(f"checkpoint {self.path} records no batch layout; delete it to start over")
            if self.MEAN_KEY in saved.tensors:
                self.plan.mean = saved.tensors[self.MEAN_KEY]
        return saved

    def save(self, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.plan.finish()  # the batch just saved was a probe: its measurement ends here
        tensors = dict(tensors or {})
        if self.plan.mean is not None:
            tensors[self.MEAN_KEY] = self.plan.mean
        self.inner.save({**state, self.STATE_KEY: self.plan.state()}, tensors)
