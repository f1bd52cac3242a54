"""What tests/test_distributed.py runs on every rank of a torchrun launch (and, for comparison, in one process).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py MODE OUT

MODE ``results``: every computation of ``results()``, each rank writing what it ended with to
``OUT/rank<r>.safetensors``, and an ACDC search stopped after three destinations (its checkpoint
``OUT/acdc.ckpt``); ``fail``: rank 1's metric raises; ``oom``: rank 1 runs out of memory in a batch (EAP scores
to ``OUT/oom-rank<r>.safetensors``); ``die``: rank 1's process exits in the middle of a run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import circuits
from circuits import distributed
from circuits.methods import gradient
from circuits.pipeline import select_circuit
from circuits.testing import tiny_hf, tiny_task

BATCH = 2  # 7 examples: batches of 2, 2, 2, 1, so the last round of two ranks has one batch
THRESHOLD = 0.02
STOP_AFTER = 3  # destinations of the interrupted ACDC search


def setup():
    return circuits.Model.from_hf(tiny_hf("llama")), tiny_task(batch=7, seq=8)


def results(model, task) -> dict[str, torch.Tensor]:
    """Every distributed computation of the package on one tiny model and task, as named tensors."""
    out, found = {}, {}
    computed = []  # the batches this rank computes for eap
    batch_scores = gradient._batch_scores
    gradient._batch_scores = lambda *args, **kwargs: computed.append(args[2].index) or batch_scores(*args, **kwargs)
    try:
        circuits.attribute(model, task, "eap", batch_size=BATCH, progress=False)
    finally:
        gradient._batch_scores = batch_scores
    out["eap-batches-computed"] = torch.tensor(computed)
    for method in ("eap", "eap-ig-inputs", "eap-ig-activations", "eap-ig-mask", "clean-corrupted"):
        found[method] = circuits.attribute(model, task, method, batch_size=BATCH, ig_steps=3, progress=False)
        out[method] = found[method].tensor
    out["eap-mean"] = circuits.attribute(model, task, "eap", "mean", batch_size=BATCH, progress=False).tensor
    out["eap-auto"] = circuits.attribute(model, task, "eap", batch_size="auto", progress=False).tensor
    out["exact"] = circuits.attribute(model, task, "exact", batch_size=3, progress=False).tensor
    out["exact-node"] = circuits.attribute(model, task, "exact", batch_size=3, level="node", progress=False).tensor
    spanned = circuits.Task.from_dict({**task.to_dict(), "spans": [{"A": 1, "END": -1}] * len(task)})
    for method in ("eap", "exact"):
        out[f"{method}-positions"] = circuits.attribute(
            model, spanned, method, batch_size=3, positions=True, progress=False
        ).tensor
    for level in ("neuron", "mlp-neuron"):
        scores = circuits.attribute(model, task, "eap", batch_size=BATCH, level=level, progress=False)
        out[f"eap-{level}"] = scores.tensor
    scores = found["eap"]
    curve = circuits.faithfulness_curve(model, task, scores, batch_size=BATCH)
    out["curve"] = torch.tensor(curve.frame.to_numpy(dtype="float64"))
    out["cpr-cmd"] = torch.tensor([curve.cpr, curve.cmd], dtype=torch.float64)
    evaluation = circuits.evaluate(model, task, select_circuit(scores, 20, "signed"), batch_size=BATCH)
    out["evaluation"] = torch.tensor(evaluation.per_example.to_numpy(dtype="float64"))
    out["acdc"] = circuits.acdc(model, task, THRESHOLD, batch_size=BATCH, progress=False).mask
    return out


class Stop(Exception):
    pass


def stopped_acdc(model, task, path: Path) -> None:
    """ACDC with a checkpoint, stopped (on every rank) right after its third save."""
    save, saves = circuits.resume.Checkpoint.save, []

    def counted(self, *args, **kwargs):
        save(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == STOP_AFTER:
            raise Stop

    circuits.resume.Checkpoint.save = counted
    try:
        circuits.acdc(model, task, THRESHOLD, batch_size=BATCH, checkpoint=path, progress=False)
    except Stop:
        pass
    finally:
        circuits.resume.Checkpoint.save = save


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    distributed.init()
    model, task = setup()
    if mode == "results":
        from safetensors.torch import save_file

        tensors = {name: value.contiguous() for name, value in results(model, task).items()}
        tensors["world_size"] = torch.tensor(distributed.world_size())
        save_file(tensors, out / f"rank{distributed.rank()}.safetensors")
        stopped_acdc(model, task, out / "acdc.ckpt")
    elif mode == "fail":

        def failing(logits, batch):
            if distributed.rank() == 1:
                raise ValueError("injected failure on rank 1")
            return logits[:, 0]

        failing_task = tiny_task(batch=7, seq=8, metric=failing)
        circuits.attribute(model, failing_task, "eap", batch_size=BATCH, progress=False)
    elif mode == "oom":  # rank 1 runs out of memory in its first batch of two examples
        from safetensors.torch import save_file

        batch_scores, failed = gradient._batch_scores, []

        def short_of_memory(*args, **kwargs):
            if distributed.rank() == 1 and len(args[2].tokens) == 2 and not failed:
                failed.append(args[2].index)
                raise MemoryError("injected: out of memory")
            return batch_scores(*args, **kwargs)

        gradient._batch_scores = short_of_memory
        scores = circuits.attribute(model, task, "eap", batch_size=BATCH, progress=False).tensor
        save_file({"eap": scores.contiguous()}, out / f"oom-rank{distributed.rank()}.safetensors")
    elif mode == "die":
        if distributed.rank() == 1:
            os._exit(3)
        circuits.acdc(model, task, THRESHOLD, batch_size=BATCH, progress=False)


if __name__ == "__main__":
    main()
