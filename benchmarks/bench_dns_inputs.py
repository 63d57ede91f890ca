"""DNS's projected inputs x (I − P): x U once per step (the default) against once per batch, beside vanilla.

    python benchmarks/bench_dns_inputs.py [--reps 16] [--rank 40] [--rows 4000] [--dim 1024] [--micro]

Step 1 trains on pairs of rank ``--rank`` (so DNS protects about that many input directions of
both learners), step 2 on ``--rows`` generic pairs for 5 epochs of batch 64 under the paper harness
(no clipping: DNS's fused route). Each repetition times step 2 for vanilla, DNS projecting every
batch's rows (``WEIGHT_INPUTS_BYTES = 0``) and DNS computing x U over the step's rows once (each
batch then forms its rows of x − (x U) Uᵀ), in alternating order. Prints ms per update (the step's
per-step work included) and the ratios of paired repetitions: on a noisy 2-core machine the
ratios of runs taken side by side are what to compare.
``--micro`` times one learner's forward and backward pass per route instead (``micro``), the
route that gathered the rows of the step's x (I − P) included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cmcl.train.trainer as trainer  # noqa: E402
from cmcl.data.paired import PairedFeatures  # noqa: E402
from cmcl.train.config import Harness  # noqa: E402
from cmcl.train.learners import ModalityLearners  # noqa: E402
from cmcl.train.strategies import get_strategy  # noqa: E402
from cmcl.train.strategies.base import Objective  # noqa: E402
from cmcl.types import StepInfo  # noqa: E402

HARNESS = Harness(lr=1e-4, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)
PAIR = ("text", "audio")
ROUTES = ("vanilla", "per batch", "per step")


def pairs(n: int, dim: int, seed: int, rank: int | None = None) -> PairedFeatures:
    g = torch.Generator().manual_seed(seed)
    if rank:  # both sides in a rank-`rank` subspace (the other side's coordinates permuted)
        x = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g)
        y = x[:, torch.randperm(dim, generator=g)] + 0.01 * torch.randn(n, dim, generator=g)
    else:
        x = torch.randn(n, dim, generator=g)
        y = x + 0.5 * torch.randn(n, dim, generator=g)
    return PairedFeatures.from_arrays(x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True), PAIR, 1)


def time_step(route: str, first: PairedFeatures, second: PairedFeatures, dim: int) -> tuple[float, dict]:
    trainer.WEIGHT_INPUTS_BYTES = 0 if route == "per batch" else 2 << 30
    torch.manual_seed(0)
    learners = ModalityLearners(PAIR, dim)
    strategy = get_strategy("vanilla") if route == "vanilla" else get_strategy("dns", lambda_min=1e-3)
    strategy.setup(learners, Objective())
    trainer.fit_step(learners, strategy, StepInfo(1, "A", PAIR, 1), first, harness=HARNESS, epochs=1, batch_size=64)
    r = trainer.fit_step(learners, strategy, StepInfo(2, "B", PAIR, 2), second, harness=HARNESS, epochs=5,
                         batch_size=64)
    return 1000 * r.seconds / r.updates, strategy.report()


def micro(rows: int, dim: int, rank: int, chunks: int = 60, batch: int = 64) -> None:
    """One learner's forward and backward per update: a plain ``nn.Linear``, and the weight gradient
    from x (I − P) projected per batch, from the batch's rows of the step's projection (the route
    before issue 14's ninth session), and from the batch's rows of the step's x U (the current
    route); chunks of 50 updates in alternating order, the paired extra over plain reported."""
    from cmcl.data.paired import take_rows
    from cmcl.train.learners import _GradInputLinear

    x_all = torch.randn(rows, dim)
    u = torch.linalg.qr(torch.randn(dim, rank))[0]
    project = lambda x: torch.addmm(x, x @ u, u.T, alpha=-1)  # noqa: E731
    projected, xu = project(x_all), x_all @ u
    layer, gz, gen = torch.nn.Linear(dim, dim), torch.randn(batch, dim), torch.Generator().manual_seed(0)

    def run(route: str, idx: torch.Tensor) -> None:
        x = take_rows(x_all, idx)
        if route == "plain":
            z = layer(x)
        else:
            if route == "per batch":
                xg = project(x)
            elif route == "x (I-P) rows":
                xg = take_rows(projected, idx)
            else:
                xg = torch.addmm(x, take_rows(xu, idx), u.T, alpha=-1)
            z = _GradInputLinear.apply(x, xg, layer.weight, layer.bias)
        z.backward(gz)

    routes = ("plain", "per batch", "x (I-P) rows", "x U rows")
    times: dict[str, list[float]] = {r: [] for r in routes}
    for c in range(chunks):
        for route in routes if c % 2 == 0 else routes[::-1]:
            batches = [torch.randperm(rows, generator=gen)[:batch] for _ in range(50)]
            t0 = time.perf_counter()
            for idx in batches:
                layer.weight.grad = layer.bias.grad = None
                run(route, idx)
            times[route].append((time.perf_counter() - t0) / 50 * 1e3)
    t = {r: np.array(v) for r, v in times.items()}
    print(f"one learner, {rows} rows, k = {rank}, torch threads {torch.get_num_threads()}, {chunks} chunks of 50 updates")
    for r in routes:
        print(f"{r:12s} median {np.median(t[r]):.3f} ms per update; paired extra over plain: median "
              f"{np.median(t[r] - t['plain']):.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=16, help="repetitions of the three routes (default 16)")
    ap.add_argument("--rank", type=int, default=40, help="directions DNS protects on each learner (default 40)")
    ap.add_argument("--rows", type=int, default=4000, help="pairs per step (default 4000)")
    ap.add_argument("--dim", type=int, default=1024, help="embedding width (default 1024)")
    ap.add_argument("--micro", action="store_true", help="time one learner's update per route instead of whole steps")
    args = ap.parse_args()
    if args.micro:
        return micro(args.rows, args.dim, args.rank)
    first = pairs(args.rows, args.dim, 1, rank=args.rank)
    second = pairs(args.rows, args.dim, 2)
    times: dict[str, list[float]] = {r: [] for r in ROUTES}
    report: dict[str, float] = {}
    for rep in range(args.reps):
        for route in ROUTES if rep % 2 == 0 else ROUTES[::-1]:
            ms, strategy_report = time_step(route, first, second, args.dim)
            times[route].append(ms)
            report = strategy_report if route != "vanilla" else report
    print(f"DNS ranks kept: text {report['dns/rank_in/text']:.0f}, audio {report['dns/rank_in/audio']:.0f}; "
          f"torch threads {torch.get_num_threads()}; {args.reps} repetitions")
    t = {r: np.array(v) for r, v in times.items()}
    for r in ROUTES:
        print(f"{r:10s} median {np.median(t[r]):7.3f} ms per update; paired ratio to vanilla: median "
              f"{np.median(t[r] / t['vanilla']):.4f}, mean {np.mean(t[r] / t['vanilla']):.4f}")
    ratio = t["per step"] / t["per batch"]
    print(f"per step / per batch, paired: median {np.median(ratio):.4f}, mean {np.mean(ratio):.4f}")


if __name__ == "__main__":
    main()
