"""Running the runs of a sweep: in this process or in N worker processes, each failure kept to its run.

:func:`cmcl.pipeline.train_runs` validates every run of a sweep (strategies x grid x seeds) and hands
the configurations here. :func:`run_sweep` trains them one after another (``jobs=1``) or in ``jobs``
spawned worker processes (never forked: the parent's torch thread pool may be running), logs one
line per finished run, and returns one :class:`Outcome` per run; a run that fails does not stop the
others.

Numbers are a function of the configuration *and* the number of torch threads a run computes with
(CPU float reductions are split by thread), so every run of a sweep computes with ``threads``
threads, whatever ``jobs`` is: ``--jobs N --threads T`` gives the numbers of ``--jobs 1 --threads T``
bit for bit. The thread count is recorded in every step's ``metrics.json``.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmcl.errors import CMCLError

log = logging.getLogger("cmcl")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int, threads: int | None = None) -> int:
    """``threads`` if given, else the cores divided between ``jobs`` (at least 1)."""
    return int(threads) if threads else max(1, available_cores() // max(1, jobs))


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a ``{key: [values]}`` grid, in the order given (``[{}]`` for no grid)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


@dataclass
class Outcome:
    """How one run of a sweep ended."""

    label: str
    seed: int
    run: Path | None = None
    seconds: float = 0.0
    summary: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    #: the failure is the user's (a CMCLError or an OSError: exit status 2) rather than a bug (1)
    user_error: bool = False
    #: the exception itself, for runs trained in this process (not sent between processes)
    exc: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        """One line for the progress log and the final report."""
        name = f"{self.label} seed {self.seed}"
        if not self.ok:
            return f"{name}: FAILED after {self.seconds:.1f}s: {self.error}"
        shown = "  ".join(f"{k} {self.summary[k]:.2f}" for k in ("R@10", "Acc") if k in self.summary)
        return f"{name}: done in {self.seconds:.1f}s" + (f" ({shown})" if shown else "")


class SweepFailed(Exception):
    """Some runs of a sweep failed; the others finished. ``exit_code``: 2 when every failure is the
    user's (a bad folder, a changed configuration), 1 when one is a bug."""

    def __init__(self, failed: list[Outcome], total: int) -> None:
        self.failed = failed
        self.total = total
        self.exit_code = 2 if all(o.user_error for o in failed) else 1
        lines = [f"{len(failed)} of {total} runs failed (the others finished; --resume continues them):"]
        lines += [f"  {o.line()}" for o in failed]
        super().__init__("\n".join(lines))


def _outcome_of_error(label: str, seed: int, exc: BaseException, start: float, keep: bool) -> Outcome:
    user = isinstance(exc, (CMCLError, OSError))
    if user:
        message = str(exc)
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or exc}"
    else:
        message = f"{type(exc).__name__}: {exc}"
        log.error("%s seed %d: unexpected error\n%s", label, seed,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
    return Outcome(label, seed, seconds=time.perf_counter() - start, error=message, user_error=user,
                   exc=exc if keep else None)


#: ``train(cfg) -> (run folder, summary)``: trains one validated configuration.
TrainOne = Callable[[Any], "tuple[Path, dict[str, float]]"]


def _attempt(train: TrainOne, cfg: Any, keep_exc: bool) -> Outcome:
    start = time.perf_counter()
    label = cfg.label or cfg.strategy
    try:
        run, summary = train(cfg)
    except Exception as exc:  # noqa: BLE001 (one run's failure must not stop the sweep)
        return _outcome_of_error(label, cfg.seed, exc, start, keep_exc)
    return Outcome(label, cfg.seed, run, time.perf_counter() - start, dict(summary))


# ------------------------------------------------------------------ worker processes
_WORKER: dict[str, Any] = {}


def _watch_parent(parent: int) -> None:
    """End this worker when the process that started it is gone (killed: it cannot clean up)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def _init_worker(threads: int, parent: int, level: int, train_path: str) -> None:
    import importlib

    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="cmcl-parent-watch").start()
    if not log.handlers:  # warnings of a worker (random-weight features, say) reach the user's stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(max(level, logging.WARNING))  # per-step lines would interleave: the parent logs per run
    module, _, name = train_path.partition(":")
    _WORKER["train"] = getattr(importlib.import_module(module), name)


def _in_worker(cfg: Any, options: dict[str, Any]) -> Outcome:
    return _attempt(lambda c: _WORKER["train"](c, **options), cfg, keep_exc=False)


def run_sweep(cfgs: Sequence[Any], train: TrainOne, *, jobs: int = 1, threads: int | None = None,
              worker_train: str | None = None, worker_options: dict[str, Any] | None = None) -> list[Outcome]:
    """Train every configuration; returns their outcomes in the order of ``cfgs``.

    Args:
        cfgs: validated run configurations (``label``, ``strategy`` and ``seed`` are read).
        train: trains one configuration in this process (``jobs == 1``).
        jobs: worker processes; with more than one, ``worker_train`` (``"module:function"``, called
            as ``function(cfg, **worker_options)`` in the worker) trains each run.
        threads: torch threads per run (default: the cores divided between the jobs).
    """
    n = len(cfgs)
    outcomes: list[Outcome | None] = [None] * n
    per_run = threads_per_job(jobs, threads)
    finished = 0

    def report(i: int, outcome: Outcome) -> None:
        nonlocal finished
        finished += 1
        outcomes[i] = outcome
        if outcome.ok:
            log.info("[%d/%d] %s", finished, n, outcome.line())
        elif n > 1:  # a sweep of one run ends with that run's own error, on one line
            log.warning("[%d/%d] %s", finished, n, outcome.line())

    if jobs <= 1 or n <= 1:
        import torch

        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(per_run)
        try:
            for i, cfg in enumerate(cfgs):
                report(i, _attempt(train, cfg, keep_exc=True))
        finally:
            torch.set_num_threads(before)
        return [o for o in outcomes if o is not None]

    if worker_train is None:
        raise ValueError("run_sweep: jobs > 1 needs worker_train")
    ctx = multiprocessing.get_context("spawn")
    workers = min(jobs, n)
    log.info("training %d runs in %d worker processes, %d torch thread(s) each", n, workers, per_run)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(per_run, os.getpid(), log.getEffectiveLevel(), worker_train)) as pool:
        pending = {pool.submit(_in_worker, cfg, worker_options or {}): i for i, cfg in enumerate(cfgs)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    cfg = cfgs[i]
                    try:
                        outcome = fut.result()
                    except Exception as exc:  # noqa: BLE001 (a worker died: killed, out of memory)
                        outcome = Outcome(cfg.label or cfg.strategy, cfg.seed,
                                          error=f"worker process failed ({type(exc).__name__}: {exc})")
                    report(i, outcome)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return [o for o in outcomes if o is not None]
