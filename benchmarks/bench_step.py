"""Seconds per training step of each strategy, relative to vanilla, measured in one process.

A paper-sized step: 10,000 synthetic vggsound_s (text, audio) pairs at d = 1024, 5 epochs, batch
64, AdamW. Before the timed step every strategy trains one (untimed) history step on clotho
(text, audio), so projectors, buffers and Fisher information have realistic sizes; DNS's
projector ranks are printed. Strategies are timed in interleaved rounds to spread machine noise.

    python benchmarks/bench_step.py --strategies vanilla,dns --dim 1024 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from cmcl.data.catalog import DATASETS
from cmcl.data.paired import PairedFeatures
from cmcl.extract.synthetic import SyntheticConfig, SyntheticDataset, SyntheticSpace
from cmcl.train.config import harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo


def step_data(space, name, pair, n, index):
    ds = SyntheticDataset(space, DATASETS[name])
    blocks = list(ds.rows("train", n))
    xa = torch.cat([torch.as_tensor(b[2][pair[0]]) for b in blocks])
    xb = torch.cat([torch.as_tensor(b[2][pair[1]]) for b in blocks])
    labels = torch.cat([torch.as_tensor(b[1]) for b in blocks])
    return PairedFeatures.from_arrays(xa, xb, pair, index, labels.numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="vanilla,dns")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--history", type=int, default=3_840)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--backbone", default="imagebind", help="for per-backbone strategy defaults")
    ap.add_argument("-p", action="append", default=[], metavar="STRATEGY.KEY=VALUE")
    args = ap.parse_args()
    names = args.strategies.split(",")
    params: dict[str, dict] = {n: {} for n in names}
    for item in args.p:
        key, value = item.split("=", 1)
        s, k = key.split(".", 1)
        params[s][k] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    space = SyntheticSpace(SyntheticConfig(dim=args.dim))
    history = step_data(space, "clotho", ("text", "audio"), args.history, 1)
    current = step_data(space, "vggsound_s", ("text", "audio"), args.pairs, 2)
    h = harness("paper", args.backbone, None, 1e-3)
    times: dict[str, list[float]] = {n: [] for n in names}
    reports: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in names:
            torch.manual_seed(0)
            learners = ModalityLearners(["text", "audio"], args.dim)
            strategy = get_strategy(name, backbone=args.backbone, **params[name])
            strategy.setup(learners, Objective())
            fit_step(learners, strategy, StepInfo(1, "clotho", ("text", "audio"), 1), history, harness=h,
                     epochs=1, batch_size=args.batch_size)
            t0 = time.perf_counter()
            fit_step(learners, strategy, StepInfo(2, "vggsound_s", ("text", "audio"), 2), current, harness=h,
                     epochs=args.epochs, batch_size=args.batch_size)
            times[name].append(time.perf_counter() - t0)
            reports[name] = strategy.report()
    base = statistics.median(times[names[0]])
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, d={args.dim}, {args.pairs} pairs x {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.rounds} round(s)")
    print(f"| strategy | seconds per step (median) | x {names[0]} | diagnostics |")
    print("|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        diag = ", ".join(f"{k}={v:g}" for k, v in sorted(reports[name].items()))
        print(f"| {name} | {med:.2f} | {med / base:.2f} | {diag} |")


if __name__ == "__main__":
    main()
