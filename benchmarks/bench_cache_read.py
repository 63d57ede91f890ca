"""Time loading (with validation) of a 50,000 x 1,024 split with two modalities (400 MB).

    python benchmarks/bench_cache_read.py [--rows 50000] [--dim 1024] [--repeats 5]

The first read after writing may hit a cold page cache (disk-bound); the median of the repeats
is the warm number.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from cmcl.data.features import ShardMeta, open_split, shard_path, write_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        emb = {}
        for m in ("text", "audio"):
            x = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
            emb[m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        write_split(shard_path(root, "bench", "toy", "train"), ShardMeta("bench", "toy", "train", args.dim,
                    ("text", "audio")), [f"s{i}" for i in range(args.rows)], np.zeros(args.rows), emb)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            open_split(root, "bench", "toy", "train")
            times.append(time.perf_counter() - t0)
    print(f"open_split {args.rows} x {args.dim} x 2 modalities: "
          f"first {times[0]:.2f} s, median {statistics.median(times):.2f} s, best {min(times):.2f} s")


if __name__ == "__main__":
    main()
