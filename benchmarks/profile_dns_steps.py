"""Where DNS's per-step work goes over a whole protocol: Gram matrices, eigendecompositions, projections.

    python benchmarks/bench_protocol.py --out /tmp/bench-proto --dim 1024 --strategies dns,vanilla
    python benchmarks/profile_dns_steps.py /tmp/bench-proto/features [--epochs 1]

Trains one seed of DNS (the synthetic defaults) over ``paper11`` on the cache written by the
first command, into a temporary folder, and prints the seconds and calls of each part of DNS's
per-step work (the run's ``strategy_seconds``): ``before_step`` (the projectors, with
``torch.linalg.eigh`` inside), the trainer's projection of the step's rows
(``trainer.weight_inputs``) and ``after_step`` (with the Gram matrices ``XᵀX`` inside). None of them
depends on the epochs, so one epoch is the default.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

import cmcl.train.strategies.dns as dns
import cmcl.train.trainer as trainer
from cmcl.errors import CMCLError
from cmcl.pipeline import train_one
from cmcl.train.config import TrainConfig
from cmcl.train.strategies import resolve_params

seconds: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()


def timed(key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - t0
            calls[key] += 1
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("features", type=Path, help="a synthetic feature cache (bench_protocol.py's OUT/features)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per step (default 1)")
    args = ap.parse_args()
    dns.DNS.before_step = timed("before_step", dns.DNS.before_step)
    dns.DNS.after_step = timed("after_step", dns.DNS.after_step)
    dns.DNS._gram = staticmethod(timed("  Gram matrices (in after_step)", dns.DNS._gram))
    torch.linalg.eigh = timed("  eigh (in before_step)", torch.linalg.eigh)
    trainer.weight_inputs = timed("projection of the step's rows", trainer.weight_inputs)
    cfg = TrainConfig(features=str(args.features), backbone="synthetic", strategy="dns",
                      params=resolve_params("dns", {}, "synthetic"), label="dns", epochs=args.epochs)
    with tempfile.TemporaryDirectory() as runs:
        t0 = time.perf_counter()
        try:
            train_one(cfg, Path(runs))
        except CMCLError as exc:   # a missing or bad cache, say: one line, status 2
            print(f"profile_dns_steps: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        total = time.perf_counter() - t0
    print(f"DNS over paper11, {args.epochs} epoch(s) per step: {total:.1f} s in all; torch threads "
          f"{torch.get_num_threads()}")
    for key in ("before_step", "  eigh (in before_step)", "projection of the step's rows", "after_step",
                "  Gram matrices (in after_step)"):
        print(f"{key:34s} {seconds[key]:6.2f} s  {calls[key]:3d} calls")


if __name__ == "__main__":
    main()
