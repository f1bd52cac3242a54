"""Circuits learned as edge masks by gradient descent through the engine: Edge Pruning and UGS.

Both methods keep one learnable number per edge, draw a random edge mask from it at every step, run the
task's batch through the engine with that mask (``circuits.engine.patched_forward``: every destination
reads ``in_v = const + sum_u [m_uv out_u + (1 - m_uv) patch_u]``, so the mask is the one of the patching
equation and the ablation is the task's: the corrupted prompts, a mean or zero), and descend the gradient
of a faithfulness loss plus a sparsity term. At the end the ``target_edges`` edges with the largest learned
number are selected and the circuit pruned (``circuits.circuit.prune``), so it has at most that many edges.

**Edge Pruning** (Bhaskar et al. 2024, "Finding Transformer Circuits with Edge Pruning", arXiv 2406.16778;
their code: princeton-nlp/Edge-Pruning, ``src/modeling/l0.py``, ``src/modeling/modeling_fpt2.py``,
``src/prune/fpt2_ioi.py``, ``run_scripts/*.sh``). Each edge has a log-alpha, initialised from N(10, 0.01). A
mask is a hard-concrete sample (Louizos et al. 2018), one per step for the whole batch:
``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (r - l) + l, 0, 1)``, ``u ~ U(eps, 1 - eps)``,
with ``beta = 2/3``, ``l = -0.1``, ``r = 1.1``, ``eps = 1e-6``. The loss is the faithfulness loss
(``objective="kl"``: KL(full model || masked model) at the prediction positions, mean over the batch, as
their ``compute_loss``; ``"metric"``: the task's metric, oriented so that lower is better) plus the
Lagrangian ``lambda1 (s - t) + lambda2 (s - t)^2``: ``s = 1 - E[L0] / n_edges`` is the expected edge
sparsity (``E[L0] = sum_e P(z_e > 0) = sum_e sigmoid(log_alpha_e - beta log(-l / r))``, the L0 penalty of
Louizos et al.), ``t`` the target sparsity, raised linearly from 0 over the first 5/6 of the steps (their 2500
of 3000) and then held. The
multipliers start at 0 and are *maximised* (gradient ascent) while the log-alphas are minimised: AdamW
(torch's defaults: betas (0.9, 0.999), weight decay 0.01), learning rate ``lr`` for the log-alphas and
``lagrangian_lr`` (default: ``lr``) for the multipliers (their IOI, greater-than and gendered-pronoun runs:
0.8 and 0.8; tracr-reverse 0.03 and 0.001; tracr-xproportion 1 and 1e-4), both on the HF linear schedule
with warm-up over the first 1/15 of the steps (their 200 of 3000) and decay to 0, the gradient norm clipped
to 1 (the HF Trainer's default). Differences from their code: edges only (their optional node masks and
node loss are left out; the runs above disable the node loss), and the sparsity is the expected one where
their ``modeling_fpt2.py`` uses the sampled mask's, ``1 - sum_e z_e / n_edges`` (measured here on a tiny
model, the sampled form's gradient reaches only the few edges whose sample is not clamped, and it followed
the target worse: 150 of 262 edges asked for, 105 reached in 400 steps, against 150 with the expected form).

**UGS**, uniform gradient sampling (the mask-learning baseline of MIB, Mueller et al. 2025, arXiv
2504.13151; MIB's circuit-track README names the script ``edge_pruning_unif_mib.py`` of
alestolfo/optimalablation; its sampler is ``EdgeMaskUnifSampler`` in ``mask_samplers/EdgeMaskSampler.py``).
Each edge has a logit ``alpha`` (initialised to 1) and keep probability ``p = sigmoid(alpha)``. A mask
sample is ``m = 1 - clamp((u - p) / w + 1/2, 0, 1)``, ``u ~ U(0, 1)``, with the window ``w = p (1 - p)``
(a constant for the gradient): 1 below the window, 0 above it, linear inside, so ``m`` is a Bernoulli(p)
draw except in a window of width ``w`` around ``p``, where the gradient flows (``p`` enters scaled by ``w``
for the gradient only, so that inside the window ``dm/dalpha = dp/dalpha = p (1 - p)``). Each sample's
gradient is re-weighted per edge by (samples drawn) / (samples inside their window), and each sample is
pruned of dangling edges before it is used (the pruning is no part of the gradient). The loss is the KL (or
metric) loss, mean over examples, plus ``lambda * sum_e p_e``, plus their node term ``min(lambda / 2, 2e-4)
* sum_heads (N / 2) tanh(2 c_h / N)`` (``c_h``: the sum of ``p`` over the edges out of head h and into its
inputs; N = layers x heads). ``lambda`` (``regularization``) defaults to MIB's 1e-3. AdamW with betas (0.9,
0.995), no weight decay, the gradient norm clipped to 5, and their learning-rate rule (0.05 for lambda
above 5e-4, 0.1 up to 5e-4, 0.15 up to 1e-4; a fifth of it with counterfactual patching). The edges are
ranked by ``alpha`` (MIB ranks by ``sigmoid(alpha)``: the same order). Difference: their code draws 12
masks per example at each step; the engine takes one mask per forward, so here each step splits its batch
into ``samples`` groups of consecutive examples, each with a mask of its own.

Determinism: the initial values and every step's noise come from CPU generators seeded by ``seed`` and the
step (then moved to the model's device), and step s learns from batch ``s mod n_batches``: the same seed
gives the identical circuit, and a run resumed from its checkpoint equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..batching import BatchPlan
from ..choices import (
    ABLATIONS,
    LEARN_METHODS,
    LEARN_OBJECTIVES,
    Ablation,
    LearnMethod,
    LearnObjective,
    check_choice,
    check_positive,
)
from ..circuit import Circuit, Scores, helpful_sign, prune
from ..engine import patched_forward
from ..errors import CircuitsError
from ..model import Model
from ..resume import Checkpoint, checkpoint_path, fingerprint
from ..spans import Spans
from ..task import Task, metric_values
from ..units import real_edges
from .common import EDGES, Batch, Resolution, batches, resolution_of

# Edge Pruning: the hard-concrete distribution's constants and the initial log-alphas (their l0.py, modeling_fpt2.py)
LEFT, RIGHT, BETA = -0.1, 1.1, 2 / 3
EPS = 1e-6
INIT_MEAN, INIT_STD = 10.0, 0.01
SPARSITY_WARMUP = 5 / 6  # share of the steps over which the target sparsity rises from 0 (their 2500 of 3000)
LR_WARMUP = 1 / 15  # share of the steps of linear learning-rate warm-up (their 200 of 3000)
EP_CLIP = 1.0  # the HF Trainer's max_grad_norm
# UGS (alestolfo/optimalablation edge_pruning_unif_mib.py, EdgeMaskSampler.py, MaskSampler.py)
UGS_INIT = 1.0
UGS_LAMBDA = 1e-3
UGS_NODE_CAP = 2e-4
UGS_BETAS = (0.9, 0.995)
UGS_CLIP = 5.0
UGS_WINDOW_EDGE = 1e-3  # a sample strictly between this and 1 - this lies inside its window
UGS_SAMPLES = 12

DEFAULT_STEPS = {"edge-pruning": 3000, "ugs": 2000}
DEFAULT_LR = {"edge-pruning": 0.8}
KEEP_BYTES = 2**30  # prepared batches kept across steps: their ablation values together at most this
SAVE_SECONDS = 30.0  # a checkpoint is saved when this long has passed since the last save, and at the end
FORMAT = 1  # of the learned state in a checkpoint


def learn_circuit(
    model: Model,
    task: Task,
    method: LearnMethod = "edge-pruning",
    target_edges: int | None = None,
    sparsity: float | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    ablation: Ablation = "patching",
    batch_size: int = 32,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    *,
    objective: LearnObjective = "kl",
    regularization: float | None = None,
    samples: int | None = None,
    lagrangian_lr: float | None = None,
    positions: bool = False,
) -> Circuit:
    """Learn an edge mask by gradient descent through the engine and return the circuit of its best edges.

    ``positions``: learn one mask value per edge and span (the task's spans, ``circuits.spans``); the target and
    the sparsity then count edges at a span, UGS's dangling edges are pruned span by span, and its node term
    counts a head's edges at every span.

    ``method``: ``"edge-pruning"`` (hard-concrete masks with a Lagrangian that drives the expected edge count
    to the target, Bhaskar et al. 2024) or ``"ugs"`` (MIB's uniform gradient sampling); see the module
    docstring for both definitions and their sources. Give exactly one of ``target_edges`` (the circuit's size:
    the edges with the largest learned log-alpha, then pruned, so at most that many) and ``sparsity`` (the
    share of the graph's edges left out, in (0, 1): ``target_edges = round((1 - sparsity) * len(graph))``).

    ``steps``: optimiser steps (default 3000 for Edge Pruning, their setting; 2000 for UGS), each on one batch of
    ``batch_size`` examples, the batches taken in turn. ``lr``: the learning rate (default 0.8 for Edge
    Pruning; UGS follows its rule from ``regularization``, its lambda, default 1e-3). ``lagrangian_lr`` (Edge
    Pruning): the Lagrange multipliers' learning rate (default ``lr``; their tracr runs use far smaller ones).
    ``samples`` (UGS): masks drawn per step, each for a group of the batch's examples (default 12).
    ``objective``: ``"kl"``, KL(full model || masked model) at the prediction positions, or ``"metric"``, the
    task's metric (minimised when lower is better, maximised when higher is better). ``ablation``: what an
    ablated edge carries (``ABLATIONS``). The circuit's ``scores`` are the learned numbers (Edge Pruning's
    log-alphas, UGS's alphas; ``meta["score"]`` says which): higher means kept more often.

    The same arguments and ``seed`` give the identical circuit. ``checkpoint``: a file (``circuits.resume``)
    holding the learned numbers, the optimiser's state and the step, saved every ``SAVE_SECONDS`` and at the
    end; calling again with the same path resumes there and gives the circuit an uninterrupted run gives. It
    belongs to this model, task and every argument above but ``progress``: another call with the same path
    raises ``CircuitsError`` naming what differs. ``progress`` shows a bar with the loss and the expected
    number of edges. The circuit's ``meta`` records the settings, the final loss and expected edge count, and
    the seconds taken.
    """
    resolution = resolution_of(model, task, "edge", positions)
    settings = _settings(
        model, task, method, target_edges, sparsity, steps, lr, seed, ablation, batch_size, objective,
        regularization, samples, lagrangian_lr, resolution.spans,
    )  # fmt: skip
    path = None if checkpoint is None else checkpoint_path(checkpoint)  # before the (possibly slow) fingerprint
    start_time = time.perf_counter()
    learner = (EdgePruning if method == "edge-pruning" else UniformGradientSampling)(model, task, settings, resolution)
    store = None if path is None else Checkpoint(path, fingerprint(model, task, settings.fingerprint()))
    first = _resume(store, learner)
    feed = _Feed(model, task, ablation, batch_size)
    report = dict(learner.report)
    bar = tqdm(total=settings.steps, initial=first, desc=f"learn {method}", disable=not progress, leave=False)
    last_save = time.monotonic()
    try:
        for step in range(first, settings.steps):
            batch, clean = feed(step)
            report = learner.step(step, batch, clean)
            bar.set_postfix(loss=f"{report['loss']:.4g}", edges=f"{report['expected_edges']:.1f}", refresh=False)
            bar.update(1)
            if store is not None and (time.monotonic() - last_save >= SAVE_SECONDS or step + 1 == settings.steps):
                _save(store, learner, step + 1, report)
                last_save = time.monotonic()
    finally:
        bar.close()
    meta = {
        **settings.meta(),
        **report,
        "task": task.name,
        "model": model.name,
        "n": len(task),
        "score": learner.score_name,
        "seconds": time.perf_counter() - start_time,
    }
    learned = learner.scores().detach().float().cpu()
    return Scores(model.graph, learned, "edge", meta, resolution.spans).top_n(settings.target_edges, absolute=False)


# --- the settings, checked before any work ---------------------------------------------------------------------


@dataclass
class _Settings:
    method: str
    target_edges: int
    steps: int
    lr: float
    seed: int
    ablation: str
    batch_size: int
    objective: str
    regularization: float | None
    samples: int | None
    lagrangian_lr: float | None
    n_edges: int  # the units a mask value is learned for: edges, or edges at a span
    spans: Spans | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What determines the learned mask (every setting; the model and the task are fingerprinted apart)."""
        return {"learn format": FORMAT, **self.meta()}

    def meta(self) -> dict[str, Any]:
        out = {
            "method": self.method,
            "target_edges": self.target_edges,
            "steps": self.steps,
            "lr": self.lr,
            "seed": self.seed,
            "ablation": self.ablation,
            "batch_size": self.batch_size,
            "objective": self.objective,
        }
        if self.spans is not None:  # absent by edge: their checkpoints stay valid
            out["spans"] = self.spans.to_dict()
        if self.method == "ugs":
            out["regularization"] = self.regularization
            out["samples"] = self.samples
        else:
            out["lagrangian_lr"] = self.lagrangian_lr
        return out


def _settings(
    model, task, method, target_edges, sparsity, steps, lr, seed, ablation, batch_size, objective, regularization,
    samples, lagrangian_lr=None, spans=None,
) -> _Settings:  # fmt: skip
    check_choice("method", method, LEARN_METHODS)
    check_choice("ablation", ablation, ABLATIONS)
    check_choice("objective", objective, LEARN_OBJECTIVES)
    n_edges = len(model.graph) * (1 if spans is None else len(spans))
    if (target_edges is None) == (sparsity is None):
        raise CircuitsError(
            "give exactly one of target_edges (the circuit's number of edges) and sparsity (the share of edges "
            f"left out, in (0, 1)); got target_edges={target_edges!r} and sparsity={sparsity!r}"
        )
    if sparsity is not None:
        if not _real_number(sparsity) or not 0 < sparsity < 1:
            raise CircuitsError(f"sparsity must be a number strictly between 0 and 1, got {sparsity!r}")
        target_edges = round((1 - sparsity) * n_edges)
        if target_edges < 1:
            raise CircuitsError(
                f"sparsity {sparsity!r} leaves no edge of the model's {n_edges:,} (at most {1 - 1 / n_edges:.6g})"
            )
    else:
        check_positive("target_edges", target_edges)
        if target_edges > n_edges:
            raise CircuitsError(f"target_edges is {target_edges:,} but the model's graph has {n_edges:,} edges")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    check_positive("steps", steps)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CircuitsError(f"seed must be a non-negative integer, got {seed!r}")
    if batch_size == "auto":
        raise CircuitsError(
            'batch_size "auto" is refused for learning: every step learns from one batch, so the result depends '
            "on the batch size; give a number of examples"
        )
    check_positive("batch_size", batch_size)
    if method == "ugs":
        regularization = UGS_LAMBDA if regularization is None else regularization
        _check_rate("regularization", regularization)
        samples = UGS_SAMPLES if samples is None else samples
        check_positive("samples", samples)
        lr = _ugs_lr(regularization, ablation) if lr is None else lr
        if lagrangian_lr is not None:
            raise CircuitsError("lagrangian_lr is a setting of method 'edge-pruning'; UGS has no Lagrange multipliers")
    else:
        for name, value in (("regularization", regularization), ("samples", samples)):
            if value is not None:
                raise CircuitsError(f"{name} is a setting of method 'ugs'; Edge Pruning has none")
        lr = DEFAULT_LR[method] if lr is None else lr
        lagrangian_lr = lr if lagrangian_lr is None else lagrangian_lr
        _check_rate("lagrangian_lr", lagrangian_lr)
    _check_rate("lr", lr)
    tokenized = task.check(model)  # a prompt too long, an id outside the vocabulary: before any work
    if objective == "kl" and tokenized.numeric:
        raise CircuitsError(
            f"task {task.name!r} scores numeric outputs (one output unit), where the KL divergence is always 0; "
            'use objective="metric"'
        )
    if objective == "metric":
        helpful_sign(task.higher_is_better, task.metric)  # a custom metric must say which way is better
    return _Settings(
        method, int(target_edges), steps, float(lr), seed, ablation, batch_size, objective,
        None if regularization is None else float(regularization), samples,
        None if lagrangian_lr is None else float(lagrangian_lr), n_edges, spans,
    )  # fmt: skip


def _real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rate(what: str, value: Any) -> None:
    if not _real_number(value) or value <= 0:
        raise CircuitsError(f"{what} must be a positive finite number, got {value!r}")


def _ugs_lr(regularization: float, ablation: str) -> float:
    """UGS's learning rate rule (edge_pruning_unif_mib.py): by lambda, a fifth of it with counterfactual patching."""
    lr = 1.5e-1 if regularization <= 1e-4 else 1e-1 if regularization <= 5e-4 else 5e-2
    return lr / 5 if ablation == "patching" else lr


# --- batches and the faithfulness loss -------------------------------------------------------------------------


class _Feed:
    """Step s learns from batch ``s mod n_batches``, with its ablation values and the full model's logits. Prepared
    batches are kept while their ablation values take at most ``KEEP_BYTES`` together (the batch last used always),
    so that a task of a few batches is prepared once."""

    def __init__(self, model: Model, task: Task, ablation: str, batch_size: int):
        self.model, self.task, self.ablation = model, task, ablation
        self.plan = BatchPlan.of(batch_size, model.device)
        self.n_batches = math.ceil(len(task) / batch_size)
        self.kept: dict[int, tuple[Batch, torch.Tensor]] = {}

    def __call__(self, step: int) -> tuple[Batch, torch.Tensor]:
        index = step % self.n_batches
        if index not in self.kept:
            held = sum(_bytes(batch.patch) for batch, _ in self.kept.values())
            batch = next(batches(self.model, self.task, self.ablation, self.plan, start=index))
            if held + _bytes(batch.patch) > KEEP_BYTES:
                self.kept.clear()
            with torch.no_grad():
                clean = _logits(self.model, batch, None)
            self.kept[index] = (batch, clean)
        return self.kept[index]


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _logits(model: Model, batch: Batch, mask: torch.Tensor | None, resolution: Resolution = EDGES) -> torch.Tensor:
    tokens = batch.tokens
    spans = None if mask is None else resolution.batch_spans(tokens)
    return patched_forward(
        model, tokens.clean_ids, tokens.attention_mask, mask, batch.patch, logit_positions=tokens.positions, spans=spans
    ).logits


def faithfulness_loss(
    model: Model,
    task: Task,
    batch: Batch,
    mask: torch.Tensor,
    clean: torch.Tensor,
    objective: str,
    resolution: Resolution = EDGES,
) -> torch.Tensor:
    """The per-example loss ``[B]`` of the masked model on ``batch``: KL(full || masked) at the prediction
    positions (``"kl"``), or the task's metric oriented so that lower is better (``"metric"``); a mask by span
    (``resolution``) is read at each position's span."""
    logits = _logits(model, batch, mask, resolution)
    if objective == "kl":
        return metric_values("kl", logits, batch.tokens, clean)
    return helpful_sign(task.higher_is_better, task.metric) * metric_values(task.metric, logits, batch.tokens, clean)


def _sub_batch(batch: Batch, clean: torch.Tensor, rows: slice) -> tuple[Batch, torch.Tensor]:
    """Examples ``rows`` of a batch (as wide as the batch), with their ablation values and full-model logits."""
    patch = batch.patch
    if patch is not None and patch.shape[1] != 1:
        patch = patch[:, rows]
    part = Batch(batch.tokens.rows(rows), patch, batch.n_total, batch.start, batch.trimmed, batch.index)
    return part, clean[rows]


# --- deterministic randomness ----------------------------------------------------------------------------------


def _generator(seed: int, purpose: str, step: int = 0) -> torch.Generator:
    """A CPU generator for one purpose and step: the same numbers on every device and after a resume."""
    digest = hashlib.sha256(f"circuits.learn:{seed}:{purpose}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# --- the two methods -------------------------------------------------------------------------------------------


@dataclass
class _Learner(ABC):
    """What both methods share: the learned numbers, the optimiser and the last step's report."""

    model: Model
    task: Task
    settings: _Settings
    resolution: Resolution = EDGES
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    report: dict[str, float] = field(default_factory=dict)
    score_name: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        """The learned numbers' shape: ``[n_src, n_dst]``, or ``[n_src, n_dst, S]`` by span."""
        return self.resolution.shape(self.model)

    @property
    def real(self) -> torch.Tensor:
        return real_edges(self.model.graph, self.resolution.spans).to(self.model.device)

    @abstractmethod
    def scores(self) -> torch.Tensor:
        """The learned number of every edge (higher: kept more often)."""

    @abstractmethod
    def step(self, step: int, batch: Batch, clean: torch.Tensor) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the report (loss, expected edge count, ...)."""


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Edge Pruning's mask sample: the stretched, clamped concrete variable for uniform noise ``u``."""
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0, 1)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) of the hard-concrete mask: its expected L0 norm per edge (1 - their cdf at 0)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def learned_scores(circuit: Circuit, task: Task) -> Scores:
    """A ``learn_circuit`` circuit's learned numbers as Scores that every selection ranks as the method does.

    The numbers are shifted to be >= 0 (the same order; MIB ranks UGS's edges by ``sigmoid(alpha)``, the same
    order again, but a float32 sigmoid ties the many saturated edges near 1) and given the sign of a score that
    carries the task (``helpful_sign``), so ``most_helpful``, ``top_n`` by magnitude and ``faithfulness_curve``
    all take the edges with the largest learned numbers first.
    """
    method = circuit.meta.get("method")
    if circuit.scores is None or method not in LEARN_METHODS:
        raise CircuitsError(f"a circuit of learn_circuit (one of {list(LEARN_METHODS)}) needed, got method {method!r}")
    real = real_edges(circuit.graph, circuit.spans)
    shifted = (circuit.scores - circuit.scores[real].min()).masked_fill(~real, float("nan"))
    sign = helpful_sign(task.higher_is_better, task.metric)
    return Scores(circuit.graph, sign * shifted, "edge", circuit.meta, circuit.spans)


class EdgePruning(_Learner):
    """Hard-concrete edge masks with a Lagrangian sparsity constraint (see the module docstring)."""

    def __init__(self, model: Model, task: Task, settings: _Settings, resolution: Resolution = EDGES):
        super().__init__(model, task, settings, resolution, score_name="log_alpha")
        device = model.device
        initial = torch.normal(INIT_MEAN, INIT_STD, self.shape, generator=_generator(settings.seed, "init"))
        self.params = {
            "log_alpha": initial.to(device).requires_grad_(True),
            "lambdas": torch.zeros(2, device=device, requires_grad=True),
        }
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [self.params["log_alpha"]]},
                {"params": [self.params["lambdas"]], "maximize": True, "lr": settings.lagrangian_lr},
            ],
            lr=settings.lr,
        )
        self.lr_warmup = round(LR_WARMUP * settings.steps)
        self.sparsity_warmup = round(SPARSITY_WARMUP * settings.steps)
        self.target_sparsity = 1 - settings.target_edges / settings.n_edges

    def scores(self) -> torch.Tensor:
        return self.params["log_alpha"]

    def noise(self, step: int) -> torch.Tensor:
        u = torch.rand(self.shape, generator=_generator(self.settings.seed, "noise", step))
        return (u * (1 - 2 * EPS) + EPS).to(self.model.device)

    def mask(self, log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.where(self.real, hard_concrete(log_alpha, u), 0.0)

    def expected_edges(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return keep_probability(log_alpha)[self.real].sum()

    def sparsity_at(self, step: int) -> float:
        if step < self.sparsity_warmup:
            return self.target_sparsity * step / self.sparsity_warmup
        return self.target_sparsity

    def lr_at(self, step: int) -> float:
        """The factor of the HF linear schedule with warm-up (``get_linear_schedule_with_warmup``) at optimiser
        step ``step``: it multiplies both learning rates."""
        steps, warmup = self.settings.steps, self.lr_warmup
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    def loss(self, step: int, batch: Batch, clean: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Faithfulness plus the Lagrangian term, for the mask drawn with noise ``u``."""
        log_alpha, lambdas = self.params["log_alpha"], self.params["lambdas"]
        mask = self.mask(log_alpha, u)
        objective = self.settings.objective
        faithful = faithfulness_loss(self.model, self.task, batch, mask, clean, objective, self.resolution)
        faithful = faithful.float().mean()
        expected = self.expected_edges(log_alpha)
        gap = (1 - expected / self.settings.n_edges) - self.sparsity_at(step)
        lagrangian = lambdas[0] * gap + lambdas[1] * gap**2
        info = {"faithfulness_loss": float(faithful.detach()), "expected_edges": float(expected.detach())}
        return faithful + lagrangian, info

    def step(self, step: int, batch: Batch, clean: torch.Tensor) -> dict[str, float]:
        loss, info = self.loss(step, batch, clean, self.noise(step))
        _check_finite(loss, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), EP_CLIP)
        factor = self.lr_at(step)
        self.optimizer.param_groups[0]["lr"] = factor * self.settings.lr
        self.optimizer.param_groups[1]["lr"] = factor * self.settings.lagrangian_lr
        self.optimizer.step()
        with torch.no_grad():
            expected = float(self.expected_edges(self.params["log_alpha"]))
        return {
            "loss": float(loss.detach()),
            "faithfulness_loss": info["faithfulness_loss"],
            "expected_edges": expected,
        }


class UniformGradientSampling(_Learner):
    """MIB's UGS baseline (see the module docstring)."""

    def __init__(self, model: Model, task: Task, settings: _Settings, resolution: Resolution = EDGES):
        super().__init__(model, task, settings, resolution, score_name="alpha (logit of the keep probability)")
        graph, device = model.graph, model.device
        self.params = {"alpha": torch.full(self.shape, UGS_INIT, device=device, requires_grad=True)}
        self.optimizer = torch.optim.AdamW([self.params["alpha"]], lr=settings.lr, betas=UGS_BETAS, weight_decay=0)
        self.node_reg = min(0.5 * settings.regularization, UGS_NODE_CAP)
        heads = torch.zeros(graph.n_src, dtype=torch.bool)
        for slots in graph.layers:
            heads[slots.heads] = True
        self.heads = heads.to(device)
        self.feeds = graph.feeds.to(device=device, dtype=torch.float32)  # [n_dst, n_src]

    def scores(self) -> torch.Tensor:
        return self.params["alpha"]

    def noise(self, step: int, count: int) -> torch.Tensor:
        u = torch.rand(count, *self.shape, generator=_generator(self.settings.seed, "noise", step))
        return u.to(self.model.device)

    def samples(self, alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Mask samples ``[k, n_src, n_dst]`` for uniform noise ``u``: Bernoulli(p) outside a window of width
        p(1 - p) around p, linear inside it, the gradient flowing inside the window only."""
        p = torch.sigmoid(alpha)
        window = (p * (1 - p)).detach().clamp_min(1e-12)  # the clamp only keeps 0 / 0 away where p is 0 or 1
        scaled = window * p - (window - 1) * p.detach()  # the value p; the gradient times the window
        return 1 - ((u - scaled) / window + 0.5).clamp(0, 1)

    def weights(self, drawn: torch.Tensor) -> torch.Tensor:
        """Per edge, (samples drawn) / (samples inside their window), 0 if none: each sample's gradient weight."""
        inside = ((drawn > UGS_WINDOW_EDGE) & (drawn < 1 - UGS_WINDOW_EDGE)).sum(0)
        return torch.where(inside < 1, 0.0, len(drawn) / inside.clamp_min(1))

    def without_dangling(self, sample: torch.Tensor) -> torch.Tensor:
        """A sample times its nonzero edges pruned of dangling ones (the pruning is no part of the gradient)."""
        kept = prune(self.model.graph, (sample.detach() > 0).cpu() & self.real.cpu(), self.resolution.spans)
        return sample * kept.to(device=sample.device, dtype=sample.dtype)

    def regularizer(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``lambda * sum_e p_e`` plus the node term over attention heads; and the expected edge count."""
        p = torch.where(self.real, torch.sigmoid(alpha), 0.0)
        expected = p.sum()
        if p.dim() == 3:  # by span: a node's edges at every span
            p = p.sum(2)
        complexity = p.sum(1) + p.sum(0) @ self.feeds  # per source node: edges out, and into its inputs
        graph = self.model.graph
        n = graph.n_layers * graph.n_heads
        node = (n / 2 * torch.tanh(2 * complexity[self.heads] / n)).sum()
        return self.settings.regularization * expected + self.node_reg * node, expected

    def groups(self, size: int) -> list[slice]:
        k = min(self.settings.samples, size)
        bounds = [round(i * size / k) for i in range(k + 1)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def loss_terms(
        self, batch: Batch, clean: torch.Tensor, u: torch.Tensor
    ) -> tuple[list[Callable[[], torch.Tensor]], Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
        """The step's loss as separately differentiable terms (one per mask sample, then the regulariser), so
        that each sample's graph is freed after its backward; their sum is the loss."""
        alpha = self.params["alpha"]
        rows = self.groups(len(batch.tokens))
        with torch.no_grad():
            weights = self.weights(self.samples(alpha, u[: len(rows)]))
        size = len(batch.tokens)

        def term(k: int, part: slice) -> Callable[[], torch.Tensor]:
            def compute() -> torch.Tensor:
                sample = self.samples(alpha, u[k])
                sample = weights * sample + (1 - weights) * sample.detach()
                mask = torch.where(self.real, self.without_dangling(sample), 0.0)
                sub, sub_clean = _sub_batch(batch, clean, part)
                objective = self.settings.objective
                values = faithfulness_loss(self.model, self.task, sub, mask, sub_clean, objective, self.resolution)
                return values.float().sum() / size

            return compute

        return [term(k, part) for k, part in enumerate(rows)], lambda: self.regularizer(alpha)

    def step(self, step: int, batch: Batch, clean: torch.Tensor) -> dict[str, float]:
        count = len(self.groups(len(batch.tokens)))
        terms, regularizer = self.loss_terms(batch, clean, self.noise(step, count))
        self.optimizer.zero_grad(set_to_none=True)
        faithful = 0.0
        for compute in terms:
            value = compute()
            _check_finite(value, step)
            value.backward()
            faithful += float(value.detach())
        penalty, expected = regularizer()
        penalty.backward()
        torch.nn.utils.clip_grad_norm_([self.params["alpha"]], UGS_CLIP)
        self.optimizer.step()
        with torch.no_grad():
            expected = float(torch.sigmoid(self.params["alpha"])[self.real].sum())
        return {"loss": faithful + float(penalty.detach()), "faithfulness_loss": faithful, "expected_edges": expected}


def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise CircuitsError(
            f"the loss is not finite at step {step}: the model's outputs or the metric overflowed; "
            "run in float32, lower lr, or use objective='kl'"
        )


# --- checkpoints -----------------------------------------------------------------------------------------------


def _resume(store: Checkpoint | None, learner: _Learner) -> int:
    """Load the learned numbers and the optimiser's state from ``store``; the step to go on from (0 if none)."""
    saved = None if store is None else store.load()
    if saved is None:
        return 0
    state, tensors = saved.state, saved.tensors
    step = state.get("step")
    names = [f"param.{name}" for name in learner.params]
    if not isinstance(step, int) or step < 0 or any(name not in tensors for name in names):
        raise CircuitsError(f"checkpoint {store.path} holds no learned edge mask of this run; delete it")
    with torch.no_grad():
        for name, param in learner.params.items():
            value = tensors[f"param.{name}"]
            if value.shape != param.shape:
                raise CircuitsError(f"checkpoint {store.path} holds a mask of another shape; delete it")
            param.copy_(value.to(param.device))
    optimizer_state = {}
    for index in range(len(learner.params)):
        entries = {key.split(".", 2)[2]: value for key, value in tensors.items() if key.startswith(f"optim.{index}.")}
        if entries:
            entries["step"] = entries["step"].reshape(())
            param = next(p for i, p in enumerate(learner.params.values()) if i == index)
            optimizer_state[index] = {
                key: value if key == "step" else value.to(param.device) for key, value in entries.items()
            }
    current = learner.optimizer.state_dict()
    learner.optimizer.load_state_dict({"state": optimizer_state, "param_groups": current["param_groups"]})
    learner.report = {key: float(value) for key, value in state.get("report", {}).items()}
    return step


def _save(store: Checkpoint, learner: _Learner, step: int, report: dict[str, float]) -> None:
    tensors = {f"param.{name}": param.detach() for name, param in learner.params.items()}
    for index, entry in learner.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = tensor.detach().reshape(-1) if key == "step" else tensor.detach()
    store.save({"step": step, "report": report}, tensors)


__all__ = [
    "EdgePruning",
    "UniformGradientSampling",
    "faithfulness_loss",
    "hard_concrete",
    "keep_probability",
    "learn_circuit",
]
