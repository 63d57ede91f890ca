"""Two BLAS thread pools in one process: what a numpy product costs the torch product after it.

numpy's wheels bring OpenBLAS and torch's bring their own BLAS (MKL with OpenMP on x86). Each keeps
a pool of worker threads, and after a product those threads spin for a while waiting for more
work. When the two libraries take turns, as scoring did (a pool's inner products in numpy, the
next split's embedding through the learners in torch), each product starts while the other
library's threads still hold the cores. This benchmark times the same torch product after a
numpy product and after a torch product of the same shape, in blocks of rounds of each kind, the
kinds of block alternating (the spinning outlasts a round, so one block holds one kind):

    python benchmarks/bench_thread_pools.py                  # scoring's shapes, 200 rounds
    python benchmarks/bench_thread_pools.py --rows 8192      # DNS's Gram block (Bᵀ B) before the learners

The last line is the cost of a turn: how much longer the torch product takes after numpy's.
Single-threaded (``--threads 1``) there is nothing to spin, and the difference should vanish.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000,
                    help="rows of the product taking turns with torch's (1,000: a pool of the paper's recall)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2000, help="rows of torch's product through a d x d learner")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--block", type=int, default=20, help="rounds of one kind in a row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(args.rows, args.dim, generator=gen)
    an = a.numpy()
    x = torch.randn(args.batch, args.dim, generator=gen)
    w = torch.randn(args.dim, args.dim, generator=gen)
    other = {"numpy": lambda: an @ an.T, "torch": lambda: a @ a.T}
    if args.rows > args.dim:   # a Gram block, Bᵀ B, as DNS forms them
        other = {"numpy": lambda: an.T @ an, "torch": lambda: a.T @ a}

    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    for f in (*other.values(), lambda: x @ w.T):   # warm both pools up
        for _ in range(5):
            f()
    after = {"numpy": [], "torch": []}
    own = {"numpy": [], "torch": []}
    # in each round one library's product, then torch's; the kinds of block alternate
    for r in range(args.rounds // args.block):
        lib = ("numpy", "torch")[r % 2]
        for _ in range(args.block):
            own[lib].append(timed(other[lib]))
            after[lib].append(timed(lambda: x @ w.T))
    ms = {k: 1e3 * float(np.median(v)) for k, v in after.items()}
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; "
          f"{args.rounds} rounds, medians")
    shape = f"{args.rows} x {args.dim}" + (" (Bᵀ B)" if args.rows > args.dim else " (A Aᵀ)")
    for lib in ("numpy", "torch"):
        print(f"  {lib:5s} product of {shape}: {1e3 * float(np.median(own[lib])):7.2f} ms;  then torch's "
              f"{args.batch} x {args.dim} by {args.dim} x {args.dim}: {ms[lib]:7.2f} ms")
    print(f"a turn from numpy to torch costs torch's product {ms['numpy'] - ms['torch']:+.2f} ms "
          f"({ms['numpy'] / ms['torch']:.2f}x)")


if __name__ == "__main__":
    main()
