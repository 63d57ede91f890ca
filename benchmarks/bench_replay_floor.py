"""The floor DER's or DER++'s replayed rows set on its cost per update, beside what it measures.

    python benchmarks/bench_replay_floor.py [--strategy derpp] [--blocks 13] [--dim 1024]

Every update of DER (DER++) forwards one (two) draws of ``replay_batch`` stored pairs through
each trainable learner together with the batch, and forms the weight gradient of all those rows:
64 + 64 (+ 64) rows per learner against vanilla's 64. Those products alone make an update cost at
least ``vanilla + 2 (t_R - t_64)``, where ``t_R`` is one learner's forward and weight-gradient
products over R rows, so DER / vanilla is at least ``1 + 2 (t_R - t_64) / vanilla``: the floor
issue 14 §3 asks for where a target is out of the method's reach. The rest of the update is the
strategy's own work (draws, reservoir offers, gathers, score terms).

Each block times, in an order that reverses from block to block: a vanilla step and a step of the
strategy (``--pairs`` pairs, one epoch, batch 64, after an untimed history step on the same pair,
so late in the step every replayed row is trainable, as in ``bench_step.py``), and one learner's
forward and backward passes over 64 and R rows (100 passes each, after 5 untimed). The first block
warms up and is dropped; the medians over the rest and the per-block ratios are printed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from bench_step import step_data
from cmcl.extract.synthetic import SyntheticConfig, SyntheticSpace
from cmcl.train.config import harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

PAIR = ("text", "audio")
BATCH = 64


def passes(layer: torch.nn.Linear, x: torch.Tensor, reps: int) -> float:
    """Milliseconds per forward and backward pass of ``layer`` over ``x`` (weight and bias gradients)."""
    def once() -> None:
        out = layer(x)
        out.backward(torch.ones_like(out))
        layer.weight.grad = layer.bias.grad = None
    for _ in range(5):
        once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="derpp", choices=("der", "derpp"))
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=2560, help="pairs of the timed step (default 2560)")
    ap.add_argument("--history", type=int, default=3840, help="pairs of the untimed history step (default 3840)")
    ap.add_argument("--blocks", type=int, default=13, help="alternating blocks, the first dropped (default 13)")
    ap.add_argument("--reps", type=int, default=100, help="passes per timing of one learner (default 100)")
    args = ap.parse_args()
    if args.blocks < 2:
        ap.error("--blocks must be at least 2 (the first one is dropped)")
    probe = get_strategy(args.strategy, backbone="imagebind")
    rows = BATCH + (2 if args.strategy == "derpp" else 1) * probe.replay_batch
    space = SyntheticSpace(SyntheticConfig(dim=args.dim))
    history = step_data(space, "clotho", PAIR, args.history, 1)
    current = step_data(space, "vggsound_s", PAIR, args.pairs, 2)
    h = harness("paper", "imagebind", None, 1e-3)
    torch.manual_seed(0)
    layer = torch.nn.Linear(args.dim, args.dim)
    inputs = {n: torch.randn(n, args.dim) for n in (BATCH, rows)}

    def step(name: str) -> float:
        torch.manual_seed(0)
        learners = ModalityLearners(PAIR, args.dim)
        strategy = get_strategy(name, backbone="imagebind")
        strategy.setup(learners, Objective())
        fit_step(learners, strategy, StepInfo(1, "clotho", PAIR, 1), history, harness=h, epochs=1, batch_size=BATCH)
        r = fit_step(learners, strategy, StepInfo(2, "vggsound_s", PAIR, 2), current, harness=h, epochs=1,
                     batch_size=BATCH)
        return r.seconds / r.updates * 1e3

    blocks = []
    for b in range(args.blocks):
        order: list[str | int] = ["vanilla", args.strategy, BATCH, rows]
        blocks.append({k: step(k) if isinstance(k, str) else passes(layer, inputs[k], args.reps)
                       for k in (order if b % 2 == 0 else order[::-1])})
    blocks = blocks[1:]

    def spread(values: list[float], unit: str = "") -> str:
        return f"median {statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, d={args.dim}, {args.pairs} pairs, {len(blocks)} blocks")
    s = args.strategy
    for label, key in (("vanilla update", "vanilla"), (f"{s} update", s),
                       (f"one learner, {BATCH} rows", BATCH), (f"one learner, {rows} rows", rows)):
        print(f"{label:<36} {spread([b[key] for b in blocks], ' ms')}")
    print(f"{s + ' / vanilla':<36} {spread([b[s] / b['vanilla'] for b in blocks])}")
    print(f"{f'floor 1 + 2 (t{rows} - t{BATCH}) / vanilla':<36} "
          f"{spread([1 + 2 * (b[rows] - b[BATCH]) / b['vanilla'] for b in blocks])}")
    print(f"{s + ' own work per update':<36} "
          f"{spread([b[s] - b['vanilla'] - 2 * (b[rows] - b[BATCH]) for b in blocks], ' ms')}")


if __name__ == "__main__":
    main()
