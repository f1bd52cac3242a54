"""Train a 2-layer attention-only transformer to do induction, and establish its circuit by exact patching.

    python scripts/train_induction.py            # train (a few minutes), analyse, save
    python scripts/train_induction.py --analyse  # redo the analysis of the saved model

Training data: ``BOS, r filler tokens, x_1 ... x_n, x_1 ... x_n`` with ``n`` drawn from
``[MIN_REPEAT, MAX_REPEAT]`` per sequence and ``r = SEQ_LEN - 1 - 2n`` (every sequence is
``SEQ_LEN`` long); the segment's tokens are distinct, the filler is drawn with replacement. The
loss is the cross-entropy of predicting ``x_2 ... x_n`` in the repeat, the only tokens that are
predictable. The repeat's offset varies with ``n``, so a head that attends a fixed distance back
cannot solve it: the model has to match content (a previous-token head feeding an induction head).

The task (``task.json``): clean = ``BOS, filler, x_1 ... x_n, x_1 ... x_k`` predicting ``x_{k+1}``;
corrupted = the same with the first occurrence replaced by fresh distinct tokens ``y_1 ... y_n``
(the filler, the x and the y share no token), so in the corrupted prompt the current token ``x_k``
has no earlier occurrence and induction has nothing to copy. The metric is
``logit[x_{k+1}] - logit[y_{k+1}]`` (the corrupted context's token at the copied position).

The circuit (``truth.json``): the edges whose exact patching score (metric with the edge patched
minus the clean metric, mean over the task) is at most ``-TRUTH_FRACTION`` times the total
effect (clean metric minus corrupted metric), cross-checked by the heads' attention patterns.
Everything is seeded; with the same torch build and thread count the weights are bit-identical.

Choices (see results/ground_truth/induction.md): LayerNorm, because without it the same budget
only learned to copy tokens from the context; two heads per layer, because with four every
layer-1 head became an induction head and no single edge carried much of the effect.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from circuits import Model, Task, attribute
from circuits.ground_truth import DATA, task_to_json
from circuits.io import atomic_write_text
from circuits.native import NativeConfig, NativeTransformer

NAME = "induction-2l"
COMMAND = "python scripts/train_induction.py"
VOCAB = 64  # token 0 is BOS
BOS = 0
SEQ_LEN = 32
MIN_REPEAT, MAX_REPEAT = 4, 12
CONFIG = NativeConfig(
    vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=2, d_head=32, n_positions=SEQ_LEN, layer_norm=True
)
SEED = 0
STEPS = 1200
BATCH = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
INIT_STD = 0.02
THREADS = 2
TASK_SEED, TASK_SIZE = 1, 64
EVAL_SEED = 2
TRUTH_FRACTION = 0.05


# --- data -----------------------------------------------------------------------------------------


def sample_batch(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences ``[batch, SEQ_LEN]`` and the mask of positions whose next token is predictable.

    ``mask[b, t]`` is True where token ``t + 1`` is ``x_2 ... x_n`` of the repeat (the input at ``t`` is
    the repeat's ``x_1 ... x_{n-1}``).
    """
    n = torch.randint(MIN_REPEAT, MAX_REPEAT + 1, (batch, 1), generator=generator)
    filler_len = SEQ_LEN - 1 - 2 * n
    segment = torch.rand(batch, VOCAB - 1, generator=generator).argsort(1)[:, :MAX_REPEAT] + 1  # distinct tokens
    filler = torch.randint(1, VOCAB, (batch, SEQ_LEN), generator=generator)
    t = torch.arange(SEQ_LEN)[None, :]
    offset = t - 1 - filler_len  # index into the first occurrence
    index = torch.where(offset >= n, offset - n, offset).clamp(0, MAX_REPEAT - 1)
    ids = torch.where(offset >= 0, segment.gather(1, index), filler)
    ids[:, 0] = BOS
    repeat_start = 1 + filler_len + n
    mask = (t >= repeat_start) & (t <= SEQ_LEN - 2)
    return ids, mask


def in_context_accuracy(model: NativeTransformer, seed: int = EVAL_SEED, batches: int = 8) -> tuple[float, float]:
    """Top-1 accuracy and mean loss on the predictable repeat positions of fresh sequences."""
    generator = torch.Generator().manual_seed(seed)
    hits = total = 0
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            ids, mask = sample_batch(generator, BATCH)
            logits = model(ids).logits[:, :-1]
            targets = ids[:, 1:]
            keep = mask[:, :-1]
            hits += int((logits.argmax(-1) == targets)[keep].sum())
            total += int(keep.sum())
            losses.append(float(F.cross_entropy(logits[keep], targets[keep])))
    return hits / total, sum(losses) / len(losses)


def induction_task(seed: int = TASK_SEED, size: int = TASK_SIZE) -> Task:
    """The clean/corrupted prompts of the module docstring, ``size`` of them."""
    generator = torch.Generator().manual_seed(seed)
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(size):
        n = int(torch.randint(5, MAX_REPEAT - 1, (1,), generator=generator))
        k = int(torch.randint(2, n, (1,), generator=generator))  # predict x_{k+1}, k + 1 <= n
        order = (torch.randperm(VOCAB - 1, generator=generator) + 1).tolist()
        x, y, rest = order[:n], order[n : 2 * n], order[2 * n :]
        filler_len = SEQ_LEN - 1 - 2 * n
        filler = [rest[i] for i in torch.randint(0, len(rest), (filler_len,), generator=generator).tolist()]
        clean.append([BOS, *filler, *x, *x[:k]])
        corrupted.append([BOS, *filler, *y, *x[:k]])
        answers.append(x[k])
        wrong.append(y[k])
    return Task.from_token_ids(NAME, clean, corrupted, answers, wrong, metric="logit_diff")


# --- training ---------------------------------------------------------------------------------------


def train(
    steps: int = STEPS,
    seed: int = SEED,
    log_every: int = 100,
    config: NativeConfig = CONFIG,
    learning_rate: float = LEARNING_RATE,
    weight_decay: float = WEIGHT_DECAY,
    init_std: float = INIT_STD,
) -> tuple[NativeTransformer, list[dict]]:
    """The trained model and its loss curve (one row every ``log_every`` steps)."""
    torch.manual_seed(seed)
    model = NativeTransformer(config)
    model.reset_parameters(init_std)
    model.train()
    generator = torch.Generator().manual_seed(seed + 1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    curve, running, start = [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        ids, mask = sample_batch(generator, BATCH)
        logits = model(ids).logits[:, :-1]
        keep = mask[:, :-1]
        loss = F.cross_entropy(logits[keep], ids[:, 1:][keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += float(loss.detach())
        if step % log_every == 0:
            row = {"step": step, "loss": running / log_every, "seconds": time.perf_counter() - start}
            curve.append(row)
            model.eval()
            row["accuracy"] = in_context_accuracy(model, batches=2)[0]
            model.train()
            print(
                f"step {step:5d}  loss {row['loss']:.4f}  accuracy {row['accuracy']:.3f}  ({row['seconds']:.0f} s)",
                flush=True,
            )
            running = 0.0
    return model.eval(), curve


# --- analysis ---------------------------------------------------------------------------------------------


def attention_patterns(model: NativeTransformer, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention pattern ``[B, H, T, T]`` (query, key) on ``ids``."""
    patterns = []
    with torch.no_grad():
        x = model.embed_tokens(ids, torch.arange(ids.shape[1]).expand_as(ids))
        allowed = model.allowed(torch.ones_like(ids))
        for block in model.blocks:
            attn, normed = block.attn, block.ln1(x)
            q = torch.einsum("btd,hde->bhte", normed, attn.W_Q) + attn.b_Q[None, :, None]
            k = torch.einsum("btd,hde->bhte", normed, attn.W_K) + attn.b_K[None, :, None]
            scores = torch.einsum("bhqe,bhke->bhqk", q, k) * attn.scale
            patterns.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
            x = block(x, allowed)
    return patterns


@dataclass
class HeadScores:
    previous_token: torch.Tensor  # [layers, heads]: mean attention from t to t - 1 (t >= 2)
    induction: torch.Tensor  # [layers, heads]: mean attention from repeat x_i to the first x_{i+1}
    bos: torch.Tensor  # [layers, heads]: mean attention to BOS from the repeat positions


def head_scores(model: NativeTransformer, seed: int = EVAL_SEED) -> HeadScores:
    """Attention-pattern evidence for every head, on fresh training-like sequences."""
    generator = torch.Generator().manual_seed(seed)
    ids, mask = sample_batch(generator, 256)
    patterns = attention_patterns(model, ids)
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    previous = torch.zeros(n_layers, n_heads)
    induction = torch.zeros(n_layers, n_heads)
    bos = torch.zeros(n_layers, n_heads)
    rows, queries = mask.nonzero(as_tuple=True)
    # at a repeat position t holding x_i, the first x_{i+1} sits at t - n + 1, where n = t - (first x_i's position)
    first = torch.stack([(ids[r, :q] == ids[r, q]).nonzero().flatten()[0] for r, q in zip(rows, queries, strict=True)])
    target = first + 1
    steps = torch.arange(2, SEQ_LEN)
    for layer, pattern in enumerate(patterns):
        previous[layer] = pattern[:, :, steps, steps - 1].mean((0, 2))
        induction[layer] = pattern[rows, :, queries, target].mean(0)
        bos[layer] = pattern[rows, :, queries, 0].mean(0)
    return HeadScores(previous, induction, bos)


def establish_circuit(model: Model, task: Task, fraction: float = TRUTH_FRACTION) -> tuple[list[str], dict]:
    """The edges whose exact score is at most ``-fraction`` times the total effect, and the numbers behind them."""
    baseline = task.baseline(model)
    total = baseline.clean - baseline.corrupted
    edges = attribute(model, task, "exact", progress=False)
    nodes = attribute(model, task, "exact", level="node", progress=False)
    frame = edges.to_frame().dropna(subset=["score"]).sort_values("score")
    truth = [row.edge for row in frame.itertuples() if row.score <= -fraction * total]
    node_frame = nodes.to_frame().dropna(subset=["score"]).sort_values("score")
    return truth, {"baseline": baseline, "total": total, "edges": frame, "nodes": node_frame}


def task_attention(model: NativeTransformer, task: Task) -> dict[str, torch.Tensor]:
    """Mean attention per head on the task's prompts, where induction needs it.

    ``layer0 previous-token``: from the first ``x_(k+1)`` to ``x_k`` (what the induction head's key reads
    there); ``layer1 induction clean/corrupted``: from the last position to the first ``x_(k+1)`` (the
    token to copy, in the corrupted prompt the replaced one).
    """
    tokens = task.tokenize()
    rows = []
    for i in range(len(task)):
        clean = task.token_ids["clean_ids"][i]
        current = clean[-1]
        first = clean.index(current)  # x_k's first occurrence
        rows.append((i, len(clean) - 1, first + 1))
    out = {}
    for kind, ids in (("clean", tokens.clean_ids), ("corrupted", tokens.corrupted_ids)):
        patterns = attention_patterns(model, ids)
        layer0 = torch.stack([patterns[0][i, :, target, target - 1] for i, _, target in rows]).mean(0)
        layer1 = torch.stack([patterns[1][i, :, last, target] for i, last, target in rows]).mean(0)
        out[f"layer0 previous-token ({kind})"] = layer0
        out[f"layer1 induction ({kind})"] = layer1
    return out


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 2) for v in values]


# --- files ------------------------------------------------------------------------------------------------


def save(
    model: NativeTransformer,
    task: Task,
    truth: list[str],
    how: str,
    directory: Path,
    summary: dict,
    weights: bool = True,
) -> None:
    """``config.json`` and ``model.safetensors`` (unless ``weights=False``), ``task.json`` and ``truth.json``."""
    if weights:
        model.save(directory)
    description = (
        "2-layer attention-only transformer trained on repeated random sequences (induction); clean = a random "
        "sequence then the start of its repeat, predicting the next repeated token; corrupted = the first "
        "occurrence replaced by fresh tokens; metric logit[x_{k+1}] - logit[y_{k+1}]"
    )
    task_json = task_to_json(task, description, bos=BOS, training=summary)
    atomic_write_text(directory / "task.json", json.dumps(task_json) + "\n")
    truth_json = {"edges": truth, "how": how, "script": COMMAND}
    atomic_write_text(directory / "truth.json", json.dumps(truth_json, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--analyse", action="store_true", help="analyse the saved model (rewrites task.json and truth.json only)"
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=DATA / NAME)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    if args.analyse:
        native = NativeTransformer.load(args.out)
        summary = json.loads((args.out / "task.json").read_text())["training"]
        for row in summary["curve"]:
            row.pop("seconds", None)
    else:
        native, curve = train(args.steps)
        accuracy, loss = in_context_accuracy(native)
        steady = [{k: v for k, v in row.items() if k != "seconds"} for row in curve]  # files stay reproducible
        summary = {"steps": args.steps, "seed": SEED, "curve": steady, "accuracy": accuracy, "eval_loss": loss}
    print(f"in-context accuracy on the repeat (fresh sequences): {summary['accuracy']:.4f}")

    scores = head_scores(native)
    print("previous-token score (attention t -> t-1), per layer and head:")
    print(scores.previous_token.numpy().round(3))
    print("induction score (attention repeat x_i -> first x_{i+1}), per layer and head:")
    print(scores.induction.numpy().round(3))
    print("attention to BOS from repeat positions:")
    print(scores.bos.numpy().round(3))

    model = Model.from_hf(native, name=NAME)
    task = induction_task()
    truth, found = establish_circuit(model, task)
    baseline = found["baseline"]
    print(
        f"task: clean logit diff {baseline.clean:.3f}, corrupted {baseline.corrupted:.3f}, "
        f"accuracy {baseline.accuracy:.3f}, total effect {found['total']:.3f}"
    )
    print("node-level exact scores (all outgoing edges patched):")
    print(found["nodes"].head(12).to_string(index=False))
    print("edge-level exact scores, 15 most negative and the 3 most positive:")
    print(found["edges"].head(15).to_string(index=False))
    print(found["edges"].tail(3).to_string(index=False))
    print(f"truth ({len(truth)} edges, score <= -{TRUTH_FRACTION} x total effect): {truth}")
    on_task = task_attention(native, task)
    print("on the task's prompts: attention from the first x_(k+1) to x_k (layer 0) and from the last position")
    print("to the first x_(k+1) (layer 1), clean and corrupted, per head:")
    for key, values in on_task.items():
        print(f"  {key}: {values.numpy().round(3)}")
    how = (
        f"edges whose exact patching score (mean logit diff with the edge patched to the corrupted run, minus clean) "
        f"is at most -{TRUTH_FRACTION} x the total effect (clean {baseline.clean:.2f} - corrupted "
        f"{baseline.corrupted:.2f} = {found['total']:.2f}) on the {len(task)} task prompts; cross-checked by attention "
        f"patterns on fresh sequences: previous-token score (mean attention t -> t-1) of the layer-0 heads "
        f"{_rounded(scores.previous_token[0])}, induction score (mean attention from a repeated x_i to the first "
        f"x_(i+1)) of the layer-1 heads {_rounded(scores.induction[1])}; details in results/ground_truth/induction.md"
    )
    save(native, task, truth, how, args.out, summary, weights=not args.analyse)
    print(f"saved {args.out}" + (" (task.json, truth.json)" if args.analyse else ""))


if __name__ == "__main__":
    main()
