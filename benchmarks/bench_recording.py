"""Cost of the per-update recording behind Fig. 3a (o(η)/η of Theorem 6): one step with and without it.

    python benchmarks/bench_recording.py [--dim 1024] [--rows 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo
from tests.helpers import random_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategy", default="vanilla")
    args = ap.parse_args()
    pair = ("text", "audio")
    data = random_pairs(args.rows, args.dim, seed=0, pair=pair)
    h = Harness(1e-4, 1e-3, True, False, None)
    best = {}
    for name, objective in (("without", None), ("with", Objective())) * args.repeats:
        learners = ModalityLearners(list(pair), args.dim)
        strat = get_strategy(args.strategy, backbone=None)
        strat.setup(learners, Objective())
        t0 = time.process_time()
        fit_step(learners, strat, StepInfo(1, "x", pair, 1), data, harness=h, epochs=1, batch_size=64,
                 objective=objective)
        best[name] = min(best.get(name, float("inf")), time.process_time() - t0)
    print(f"{args.strategy} d={args.dim} rows={args.rows} threads={torch.get_num_threads()}: "
          f"CPU s: without {best['without']:.3f}s, with {best['with']:.3f}s, overhead {100 * (best['with'] / best['without'] - 1):.1f}%")


if __name__ == "__main__":
    main()
