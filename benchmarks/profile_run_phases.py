"""Where one run's time goes, phase by phase: validation, loading, fitting, scoring, writing.

    python benchmarks/bench_protocol.py --out /tmp/bench-proto --dim 1024 --strategies dns,vanilla
    python benchmarks/profile_run_phases.py /tmp/bench-proto/features --strategy dns [--epochs 1]

Trains one seed of a strategy (its synthetic defaults) over ``paper11`` on the cache written by
the first command, into a temporary folder, and prints the seconds and calls of each phase of
``train_one``: validating the configuration and every split before training (``plan_run``, the
test splits loaded and the train splits checked), loading each step's train split, fitting the
steps (the strategy's per-step work included), scoring (step 0 included), writing the step
folders and the summary. ``bench_protocol.py``'s total less its training and evaluation is
mostly the validation, loading and writing shown here. Only fitting depends on the epochs, so
one epoch is the default.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from profile_dns_steps import calls, seconds, timed

import cmcl.data.paired as paired
import cmcl.data.runs as run_files
import cmcl.pipeline as pipeline
import cmcl.train.trainer as trainer
from cmcl.errors import CMCLError
from cmcl.train.config import TrainConfig
from cmcl.train.strategies import resolve_params

PHASES = ("validate (plan_run)", "load a step's train split", "fit a step", "score", "write a step folder",
          "write the summary")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("features", type=Path, help="a synthetic feature cache (bench_protocol.py's OUT/features)")
    ap.add_argument("--strategy", default="dns", help="strategy to train (default dns)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per step (default 1)")
    args = ap.parse_args()
    pipeline.plan_run = timed(PHASES[0], pipeline.plan_run)
    paired.StepData.train = timed(PHASES[1], paired.StepData.train)
    trainer.fit_step = timed(PHASES[2], trainer.fit_step)
    scorer = pipeline.step_scorer
    pipeline.step_scorer = lambda plan: timed(PHASES[3], scorer(plan))
    run_files.write_step = timed(PHASES[4], run_files.write_step)
    pipeline.write_summary = timed(PHASES[5], pipeline.write_summary)
    cfg = TrainConfig(features=str(args.features), backbone="synthetic", strategy=args.strategy,
                      params=resolve_params(args.strategy, {}, "synthetic"), label=args.strategy,
                      epochs=args.epochs)
    with tempfile.TemporaryDirectory() as runs:
        t0 = time.perf_counter()
        try:
            pipeline.train_one(cfg, Path(runs))
        except CMCLError as exc:   # a missing or bad cache, say: one line, status 2
            print(f"profile_run_phases: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        total = time.perf_counter() - t0
    print(f"{args.strategy}, {args.epochs} epoch(s) per step: {total:.2f} s for train_one")
    for key in PHASES:
        print(f"  {key:28s} {seconds[key]:7.2f} s  {calls[key]:3d} calls")
    print(f"  {'the rest':28s} {total - sum(seconds[k] for k in PHASES):7.2f} s")


if __name__ == "__main__":
    main()
