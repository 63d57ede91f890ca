"""The full 11-step protocol on paper-sized synthetic features: extraction and training time.

    python benchmarks/bench_protocol.py --out /tmp/cmcl-bench --dim 1024 --strategies dns,vanilla

Writes the cache at scale 1.0 (about 227k training pairs over the 11 steps), then trains each
strategy for one seed with the paper's settings (5 epochs, batch 64, AdamW) and prints wall-clock
seconds for the whole run and per step (training, evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from cmcl.extract.synthetic import SyntheticConfig, write_synthetic
from cmcl.data import runs as ckpt
from cmcl.pipeline import train_one
from cmcl.train.config import TrainConfig
from cmcl.train.strategies import resolve_params


def write_features(out: Path, dim: int, scale: float) -> float:
    """Write the synthetic cache under ``out/features``; returns the seconds it took.

    The cache's dirty pages are flushed (``os.sync``) before anything else is timed: otherwise the
    kernel writes 1.7 GB back while the first strategy trains, and on a 2-core machine that made
    whichever strategy ran first 8-10 % slower (measured with the order of dns and vanilla swapped).
    """
    t0 = time.perf_counter()
    write_synthetic(out / "features", SyntheticConfig(dim=dim, scale=scale))
    os.sync()
    return time.perf_counter() - t0


def run_strategy(out: Path, name: str, *, epochs: int = 5, device: str = "cpu") -> dict:
    """Train one seed of ``name`` on ``out/features`` (into ``out/runs``, replacing an earlier run)
    and return its times: ``total_seconds`` (the whole run: loading and validating the features,
    training, evaluation, writing), ``train_seconds`` (whole steps, per-step strategy work
    included), ``eval_seconds`` (the scoring after each step), ``updates``, ``ms_per_update``,
    ``steps`` and the run's ``summary`` (its Table 2 numbers)."""
    runs = out / "runs"
    shutil.rmtree(runs / "synthetic" / name, ignore_errors=True)
    cfg = TrainConfig(features=str(out / "features"), backbone="synthetic", strategy=name,
                      params=resolve_params(name, {}, "synthetic"), label=name, epochs=epochs, device=device)
    t0 = time.perf_counter()
    run = train_one(cfg, runs)
    total = time.perf_counter() - t0
    found = [i for i in ckpt.finished_steps(run) if i > 0]
    steps = [json.loads((ckpt.step_dir(run, i) / "metrics.json").read_text()) for i in found]
    train_s = sum(s["train_seconds"] for s in steps)
    updates = sum(s["updates"] for s in steps)
    return {"total_seconds": total, "train_seconds": train_s, "eval_seconds": sum(s["eval_seconds"] for s in steps),
            "updates": updates, "ms_per_update": 1000 * train_s / updates, "steps": len(steps),
            "summary": json.loads((run / "summary.json").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--strategies", default="dns,vanilla")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    seconds = write_features(args.out, args.dim, args.scale)
    print(f"extract: {seconds:.1f} s (scale {args.scale}, d={args.dim})")
    for name in args.strategies.split(","):
        r = run_strategy(args.out, name, epochs=args.epochs, device=args.device)
        print(f"{name}: {r['total_seconds']:.1f} s total for {r['steps']} steps ({r['train_seconds']:.1f} s training, "
              f"{r['eval_seconds']:.1f} s evaluation, {r['updates']} updates, {r['ms_per_update']:.2f} ms per update; "
              f"torch threads {torch.get_num_threads()})")
        print("   " + "  ".join(f"{k} {v:.2f}" for k, v in r["summary"].items()))


if __name__ == "__main__":
    main()
