"""Aggregate finished run folders into the paper's Table 2, ``results.csv`` and heatmaps.

Reads run folders (:mod:`cmcl.data.runs`) and their stored evaluation rows. A run evaluated with
another recall protocol than the one asked for is re-scored by the ``rescore`` function the
application passes in (it needs the learners, which this package does not build).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cmcl.data import runs as run_files
from cmcl.errors import RunError
from cmcl.evaluate.evaluator import EvalSettings
from cmcl.evaluate.report import RESULT_COLUMNS, format_table, heatmaps, summarize_run, table2

log = logging.getLogger(__name__)

#: ``rescore(run, settings)``: the eval rows of every finished step of ``run`` under ``settings``.
Rescore = Callable[[Path, EvalSettings], pd.DataFrame]


@dataclass
class Report:
    """What :func:`report_runs` produced."""

    table: pd.DataFrame
    results: pd.DataFrame
    text: str
    files: list[Path]
    skipped: list[str]
    #: Table 3 (seconds per step) when figures were asked for
    table3: pd.DataFrame | None = None


def report_runs(runs: str | Path, report: str | Path, *, recall_protocol: str = "paper",
                rescore: Rescore | None = None, order: Sequence[str] = (), plots: bool = True,
                figures: bool = False, rescore_all: bool = False) -> Report:
    """Aggregate every complete run under ``runs`` into Table 2.

    Writes ``report`` (Table 2 as CSV: mean and std per metric, n), ``results.csv`` beside it (long
    format, one row per run x trained_through x eval_step x direction x metric) and, with ``plots``,
    heatmaps of the R@10 and Acc matrices in ``<report stem>_heatmaps/``. Incomplete runs are
    skipped with a warning.

    Args:
        runs: root of run folders.
        report: Table 2 CSV to write.
        recall_protocol: ``paper`` or ``full``; runs scored otherwise go through ``rescore``.
        rescore: re-scores a run from its checkpoints (required only when some run needs it).
        order: strategy order of the table (the paper's); others follow alphabetically.
        plots: write the heatmaps.
        figures: also write the paper's figures, Table 3 and the comparison plot
            (:mod:`cmcl.evaluate.figures`) into ``<report stem>_figures/``.
        rescore_all: re-score every run through ``rescore`` instead of reading its stored rows
            (runs scored by an earlier version of the evaluator).
    """
    report = Path(report)
    frames, summaries, skipped = [], [], []
    n_steps_by_run: dict[str, int] = {}
    labels_by_run: dict[str, list[str]] = {}
    found = run_files.find_runs(runs)
    complete: list[Path] = []
    if not found:
        raise RunError(f"{runs}: no runs found (no config.json below it)")
    for run in found:
        header = run_files.read_json(run / "config.json")
        cfg = header.get("config")
        steps = header.get("protocol", {}).get("steps")
        if not cfg or not steps:
            raise RunError(f"{run / 'config.json'}: not a cmcl run config")
        T = len(steps)
        done = run_files.finished_steps(run)
        if not done or done[-1] != T:
            skipped.append(f"{run} (finished {done[-1] if done else 0} of {T} steps)")
            log.warning("skipping incomplete run %s (finished %d of %d steps)", run, done[-1] if done else 0, T)
            continue
        if cfg.get("recall_protocol", "paper") == recall_protocol and not rescore_all:
            rows = run_files.read_eval(run)
        elif rescore is None:
            raise RunError(f"{run}: scored with recall protocol {cfg.get('recall_protocol')!r}, "
                           f"and no re-scoring was provided for {recall_protocol!r}")
        else:
            rows = rescore(run, EvalSettings(recall_protocol, cfg["pool_size"], cfg["pool_count"], cfg["eval_seed"]))
        label = cfg.get("label") or cfg["strategy"]
        summaries.append({"backbone": cfg["backbone"], "strategy": label, "seed": cfg["seed"],
                          **summarize_run(rows, T)})
        frames.append(rows.assign(run=str(run), backbone=cfg["backbone"], strategy=label,
                                  seed=cfg["seed"])[RESULT_COLUMNS])
        n_steps_by_run[str(run)] = T
        complete.append(run)
        labels_by_run[str(run)] = [f"{i + 1}:{k}" for i, k in enumerate(steps)]
    if not frames:
        raise RunError(f"{runs}: no complete run to report ({len(skipped)} incomplete)")
    results = pd.concat(frames, ignore_index=True)
    table = table2(pd.DataFrame(summaries), list(order))
    report.parent.mkdir(parents=True, exist_ok=True)
    run_files.write_csv(report, table, float_format="%.4f")
    results_path = report.with_name("results.csv")
    run_files.write_csv(results_path, results, float_format="%.4f")
    files = [report, results_path]
    if plots:
        files += heatmaps(results, report.with_name(report.stem + "_heatmaps"), n_steps_by_run, labels_by_run)
    t3 = None
    if figures:
        from cmcl.evaluate.figures import write_figures

        out = report.with_name(report.stem + "_figures")
        files += write_figures(complete, table, out)
        t3 = pd.read_csv(out / "table3.csv")
    return Report(table, results, format_table(table), files, skipped, t3)
