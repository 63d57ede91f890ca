"""Where one strategy's training step spends its time: cProfile over a step, after a history step.

The same setting as ``bench_step.py`` at a smaller size: one untimed history step on clotho
(text, audio), then the profiled step on vggsound_s (text, audio). Prints the update count, the
milliseconds per update of the update loop (the strategy's per-step work excluded), and the
functions with the most time of their own.

    python benchmarks/profile_step.py --strategy gem --pairs 4000 --epochs 2
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from bench_step import step_data
from cmcl.extract.synthetic import SyntheticConfig, SyntheticSpace
from cmcl.train.config import harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="vanilla")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=4_000)
    ap.add_argument("--history", type=int, default=3_840)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--backbone", default="imagebind", help="for per-backbone strategy defaults")
    ap.add_argument("--top", type=int, default=25, help="functions to list")
    args = ap.parse_args()
    space = SyntheticSpace(SyntheticConfig(dim=args.dim))
    history = step_data(space, "clotho", ("text", "audio"), args.history, 1)
    current = step_data(space, "vggsound_s", ("text", "audio"), args.pairs, 2)
    h = harness("paper", args.backbone, None, 1e-3)
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio"], args.dim)
    strategy = get_strategy(args.strategy, backbone=args.backbone)
    strategy.setup(learners, Objective())
    fit_step(learners, strategy, StepInfo(1, "clotho", ("text", "audio"), 1), history, harness=h, epochs=1,
             batch_size=64)
    profile = cProfile.Profile()
    profile.enable()
    r = fit_step(learners, strategy, StepInfo(2, "vggsound_s", ("text", "audio"), 2), current, harness=h,
                 epochs=args.epochs, batch_size=64)
    profile.disable()
    print(f"{args.strategy}: {r.updates} updates, {1000 * (r.seconds - r.strategy_seconds) / r.updates:.2f} ms per "
          f"update (update loop), {r.strategy_seconds:.2f} s of per-step work; torch threads {torch.get_num_threads()}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
