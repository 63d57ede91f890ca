"""A batch's rows gathered from a paper-size split: torch indexing against numpy's (what
``PairedFeatures.select`` uses on the CPU). Run it idle, and again while another job keeps a core
busy: torch's gather is multi-threaded and waits for its second thread.

    python benchmarks/bench_gather.py            # 64 of 47,584 rows of d = 1,024, 500 batches
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=47_584)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=500)
    args = ap.parse_args()
    x = torch.rand(args.rows, args.dim)
    xn = x.numpy()
    order = torch.randperm(args.rows)
    batches = [order[(i * args.batch) % (args.rows - args.batch):][:args.batch] for i in range(args.batches)]
    for name, gather in (("torch", lambda r: x[r]), ("numpy", lambda r: torch.from_numpy(xn[r.numpy()]))):
        t0 = time.perf_counter()
        for r in batches:
            gather(r)
        print(f"{name}: {1000 * (time.perf_counter() - t0) / len(batches):.3f} ms per batch "
              f"({args.batch} of {args.rows} rows, d = {args.dim}, {torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
