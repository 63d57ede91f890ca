"""The full 11-step protocol on paper-sized synthetic features: extraction and training time.

    python benchmarks/bench_protocol.py --out /tmp/cmcl-bench --dim 1024 --strategies dns,vanilla

Writes the cache at scale 1.0 (about 227k training pairs over the 11 steps), then trains each
strategy for one seed with the paper's settings (5 epochs, batch 64, AdamW) and prints wall-clock
seconds for the whole run and per step (training, evaluation), and each run's peak memory.

By default (``--schedule alternating``) every strategy's run is its own spawned process and the
runs take turns step by step, in an order that reverses at every step: with dns and vanilla,
dns trains step 1, then vanilla steps 1 and 2, then dns steps 2 and 3, and so on (A B B A A B ...).
A run's times count only its turns. So all strategies see the machine in the same state at each
step, a slow spell of the machine (2-core VMs here drift by ±20 % over minutes) no longer lands on
one strategy only, and neither does whatever going first at a step costs (a steady drift cancels
within each pair of steps). ``--schedule interleaved`` keeps one order at every step (A B A B ...,
runs 7-15 and 19-20 in docs/performance.md); ``--schedule sequential`` trains one whole run after the
other in this process, as the earlier measurements did.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
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


def run_strategy(out: Path, name: str, *, epochs: int = 5, device: str = "cpu", on_step=None) -> dict:
    """Train one seed of ``name`` on ``out/features`` (into ``out/runs``, replacing an earlier run)
    and return its times: ``total_seconds`` (the whole run: loading and validating the features,
    training, evaluation, writing), ``train_seconds`` (whole steps, per-step strategy work
    included), ``eval_seconds`` (the scoring after each step), ``updates``, ``ms_per_update``,
    ``steps``, the run's ``summary`` (its Table 2 numbers) and ``peak_rss_gb``, the process's peak
    resident memory so far (in the interleaved schedule, the run's own). ``on_step`` goes to the
    trainer; the seconds it returns (time spent waiting for a turn) are not counted in ``total_seconds``."""
    runs = out / "runs"
    shutil.rmtree(runs / "synthetic" / name, ignore_errors=True)
    cfg = TrainConfig(features=str(out / "features"), backbone="synthetic", strategy=name,
                      params=resolve_params(name, {}, "synthetic"), label=name, epochs=epochs, device=device)
    waited = [0.0]

    def hook(run: Path, index: int) -> None:
        if on_step is not None:
            waited[0] += on_step(run, index)

    t0 = time.perf_counter()
    run = train_one(cfg, runs, on_step=hook)
    total = time.perf_counter() - t0 - waited[0]
    found = [i for i in ckpt.finished_steps(run) if i > 0]
    steps = [json.loads((ckpt.step_dir(run, i) / "metrics.json").read_text()) for i in found]
    train_s = sum(s["train_seconds"] for s in steps)
    updates = sum(s["updates"] for s in steps)
    return {"total_seconds": total, "train_seconds": train_s, "eval_seconds": sum(s["eval_seconds"] for s in steps),
            "updates": updates, "ms_per_update": 1000 * train_s / updates, "steps": len(steps),
            "summary": json.loads((run / "summary.json").read_text()),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # kB on Linux


def _turns(out: Path, name: str, epochs: int, device: str, ready, go, done, steps: int, results) -> None:
    """A spawned worker: run ``name``, training only while it holds the turn, which the parent
    gives with ``go``. After each step but the last the worker gives the turn back (``done``), and
    after the run ends too. ``ready`` tells the parent that this process has imported everything (the
    first turn starts only when every worker has, so that no import competes with a timed step)."""
    ready.set()
    go.wait()
    go.clear()

    def hand_over(run: Path, index: int) -> float:
        if index == 0 or index == steps:   # the initial scoring joins step 1's turn; the end is below
            return 0.0
        t0 = time.perf_counter()
        done.set()
        go.wait()
        go.clear()
        return time.perf_counter() - t0

    try:
        results.put((name, run_strategy(out, name, epochs=epochs, device=device, on_step=hand_over)))
    except Exception as exc:  # reported by the parent, which stops the other runs
        results.put((name, repr(exc)))
        raise SystemExit(1) from None
    finally:
        done.set()


def turn_order(names: list[str], steps: int, schedule: str) -> list[tuple[int, str]]:
    """The turns as (step, strategy): every strategy's step k before any strategy's step k+1; the
    order within a step is ``names`` for ``interleaved`` and reverses at every step for
    ``alternating`` (A B, B A, A B, ...)."""
    return [(k, n) for k in range(1, steps + 1)
            for n in (names[::-1] if schedule == "alternating" and k % 2 == 0 else names)]


def run_interleaved(out: Path, names: list[str], *, epochs: int, device: str,
                    schedule: str = "alternating") -> dict[str, dict]:
    """Every strategy's run in its own process, taking turns step by step (see the module doc)."""
    from cmcl.data.protocol import load_protocol

    steps = len(load_protocol("paper11"))
    ctx = mp.get_context("spawn")
    go, done, ready = ([ctx.Event() for _ in names] for _ in range(3))
    results = ctx.Queue()
    procs = [ctx.Process(target=_turns, args=(out, n, epochs, device, ready[i], go[i], done[i], steps, results),
                         daemon=True) for i, n in enumerate(names)]
    found: dict[str, dict] = {}

    def collect(block: bool) -> None:
        while True:
            try:
                name, r = results.get(timeout=5) if block else results.get_nowait()
            except queue.Empty:
                return
            if isinstance(r, str):
                raise SystemExit(f"bench_protocol: the {name} run failed: {r}")
            found[name] = r
            block = False

    def wait_for(event, i: int, what: str) -> None:
        while not event.wait(timeout=5):
            if procs[i].exitcode is not None:
                collect(block=True)   # a failure it reported names its exception
                raise SystemExit(f"bench_protocol: the {names[i]} run died {what} (exit code {procs[i].exitcode})")
        event.clear()

    for p in procs:
        p.start()
    try:
        for i in range(len(names)):
            wait_for(ready[i], i, "while starting")
        for step, name in turn_order(names, steps, schedule):
            i = names.index(name)
            go[i].set()
            wait_for(done[i], i, f"at step {step}")
            collect(block=False)
        while len(found) < len(names):
            collect(block=True)
            dead = [n for n, p in zip(names, procs) if p.exitcode not in (None, 0) and n not in found]
            if dead:
                raise SystemExit(f"bench_protocol: the {dead[0]} run died at its end "
                                 f"(exit code {procs[names.index(dead[0])].exitcode})")
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return {n: found[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the cache (OUT/features) and the runs (OUT/runs)")
    ap.add_argument("--dim", type=int, default=1024, help="embedding width (default 1024, the paper's)")
    ap.add_argument("--scale", type=float, default=1.0, help="the paper's split sizes times this (default 1.0)")
    ap.add_argument("--strategies", default="dns,vanilla", help="comma-separated, in the order of the first turns "
                                                                 "(default dns,vanilla)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per step (default 5, the paper's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--schedule", default="alternating", choices=("alternating", "interleaved", "sequential"),
                    help="alternating: the runs take turns step by step, one process each, in an order that "
                         "reverses at every step (default); interleaved: the same, in one order at every step; "
                         "sequential: one whole run after the other, in this process")
    args = ap.parse_args()
    names = args.strategies.split(",")
    for name in names:  # an unknown name fails here, before anything is written
        try:
            resolve_params(name, {}, "synthetic")
        except Exception as exc:
            raise SystemExit(f"bench_protocol: {exc}") from None
    seconds = write_features(args.out, args.dim, args.scale)
    print(f"extract: {seconds:.1f} s (scale {args.scale}, d={args.dim}); schedule {args.schedule}")
    if args.schedule != "sequential":
        done = run_interleaved(args.out, names, epochs=args.epochs, device=args.device, schedule=args.schedule)
    else:
        done = {n: run_strategy(args.out, n, epochs=args.epochs, device=args.device) for n in names}
    for name, r in done.items():
        print(f"{name}: {r['total_seconds']:.1f} s total for {r['steps']} steps ({r['train_seconds']:.1f} s training, "
              f"{r['eval_seconds']:.1f} s evaluation, {r['updates']} updates, {r['ms_per_update']:.2f} ms per update; "
              f"torch threads {torch.get_num_threads()}; peak RSS {r['peak_rss_gb']:.2f} GB)")
        print("   " + "  ".join(f"{k} {v:.2f}" for k, v in r["summary"].items()))


if __name__ == "__main__":
    main()
