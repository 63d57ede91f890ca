"""The full 11-step protocol on paper-sized synthetic features: extraction and training time.

    python benchmarks/bench_protocol.py --out /tmp/cmcl-bench --dim 1024 --strategies dns,vanilla

Writes the cache at scale 1.0 (about 227k training pairs over the 11 steps), then trains each
strategy for one seed with the paper's settings (5 epochs, batch 64, AdamW) and prints wall-clock
seconds for the whole run and per step (training, evaluation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from cmcl.extract.synthetic import SyntheticConfig, write_synthetic
from cmcl.data import runs as ckpt
from cmcl.pipeline import train_one
from cmcl.train.config import TrainConfig
from cmcl.train.strategies import resolve_params



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--strategies", default="dns,vanilla")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    t0 = time.perf_counter()
    write_synthetic(args.out / "features", SyntheticConfig(dim=args.dim, scale=args.scale))
    print(f"extract: {time.perf_counter() - t0:.1f} s (scale {args.scale}, d={args.dim})")
    for name in args.strategies.split(","):
        runs = args.out / "runs"
        shutil.rmtree(runs / "synthetic" / name, ignore_errors=True)
        cfg = TrainConfig(features=str(args.out / "features"), backbone="synthetic", strategy=name,
                          params=resolve_params(name, {}, "synthetic"), label=name, epochs=args.epochs,
                          device=args.device)
        t0 = time.perf_counter()
        run = train_one(cfg, runs)
        total = time.perf_counter() - t0
        steps = [json.loads((ckpt.step_dir(run, i) / "metrics.json").read_text()) for i in range(1, 12)]
        train_s = sum(s["train_seconds"] for s in steps)
        eval_s = sum(s["eval_seconds"] for s in steps)
        updates = sum(s["updates"] for s in steps)
        print(f"{name}: {total:.1f} s total for 11 steps ({train_s:.1f} s training, {eval_s:.1f} s evaluation, "
              f"{updates} updates, {1000 * train_s / updates:.2f} ms per update; torch threads "
              f"{torch.get_num_threads()})")
        summary = json.loads((run / "summary.json").read_text())
        print("   " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
