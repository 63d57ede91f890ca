"""Score finished runs and write the paper's Table 2 (what ``cmcl evaluate`` calls)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cmcl.data.paired import StepData
from cmcl.data.protocol import load_protocol
from cmcl.errors import RunError
from cmcl.evaluate.evaluator import EvalSettings, evaluate
from cmcl.evaluate.report import RESULT_COLUMNS, format_table, heatmaps, summarize_run, table2
from cmcl.train import checkpoint as ckpt
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import PAPER_ORDER

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What :func:`evaluate_runs` produced."""

    table: pd.DataFrame
    results: pd.DataFrame
    text: str
    files: list[Path]
    skipped: list[str]


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory (a folder holding ``config.json``) under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such runs folder")
    return sorted(p.parent for p in root.rglob("config.json"))


def rescore_run(run: Path, settings: EvalSettings, device: str = "cpu", features: str | None = None) -> pd.DataFrame:
    """Re-evaluate every finished step of a run from its checkpoints with other eval settings."""
    header = ckpt.read_json(run / "config.json")
    cfg = header["config"]
    protocol = load_protocol(cfg["protocol"])
    data = StepData(features or cfg["features"], cfg["backbone"], protocol)
    test_sets = data.test_sets()
    learners = ModalityLearners(protocol.modalities, data.dim).to(device)
    initial = {k: v.clone() for k, v in learners.state_dict().items()}
    rows: list[dict] = []
    for i in ckpt.finished_steps(run):
        if i == 0:
            learners.load_state_dict(initial)
        else:
            ckpt.load_learners(ckpt.step_dir(run, i) / "learners.safetensors", learners)
        rows += evaluate(learners, test_sets, i, settings)
    return pd.DataFrame(rows)


def evaluate_runs(runs: str | Path, report: str | Path, *, recall_protocol: str = "paper",
                  device: str = "cpu", features: str | None = None, plots: bool = True) -> Report:
    """Aggregate every complete run under ``runs`` into Table 2.

    Writes ``report`` (Table 2 as CSV: mean and std per metric, n), ``results.csv`` beside it (long
    format, one row per run x trained_through x eval_step x direction x metric) and, with ``plots``,
    heatmaps of the R@10 and Acc matrices in ``<report stem>_heatmaps/``. Runs whose stored
    evaluation used another recall protocol are re-scored from their checkpoints; incomplete runs
    are skipped with a warning.
    """
    report = Path(report)
    frames, summaries, skipped = [], [], []
    n_steps_by_run: dict[str, int] = {}
    labels_by_run: dict[str, list[str]] = {}
    found = find_runs(runs)
    if not found:
        raise RunError(f"{runs}: no runs found (no config.json below it)")
    for run in found:
        header = ckpt.read_json(run / "config.json")
        cfg = header.get("config")
        steps = header.get("protocol", {}).get("steps")
        if not cfg or not steps:
            raise RunError(f"{run / 'config.json'}: not a cmcl run config")
        T = len(steps)
        done = ckpt.finished_steps(run)
        if not done or done[-1] != T:
            skipped.append(f"{run} (finished {done[-1] if done else 0} of {T} steps)")
            log.warning("skipping incomplete run %s (finished %d of %d steps)", run, done[-1] if done else 0, T)
            continue
        if cfg.get("recall_protocol", "paper") == recall_protocol:
            rows = ckpt.read_eval(run)
        else:
            settings = EvalSettings(recall_protocol, cfg["pool_size"], cfg["pool_count"], cfg["eval_seed"])
            rows = rescore_run(run, settings, device, features)
        summaries.append({"backbone": cfg["backbone"], "strategy": cfg.get("label") or cfg["strategy"],
                          "seed": cfg["seed"], **summarize_run(rows, T)})
        rows = rows.copy()
        rows.insert(0, "seed", cfg["seed"])
        rows.insert(0, "strategy", cfg.get("label") or cfg["strategy"])
        rows.insert(0, "backbone", cfg["backbone"])
        rows.insert(0, "run", str(run))
        frames.append(rows[RESULT_COLUMNS])
        n_steps_by_run[str(run)] = T
        labels_by_run[str(run)] = [f"{i + 1}:{k}" for i, k in enumerate(steps)]
    if not frames:
        raise RunError(f"{runs}: no complete run to report ({len(skipped)} incomplete)")
    results = pd.concat(frames, ignore_index=True)
    table = table2(pd.DataFrame(summaries), list(PAPER_ORDER))
    report.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(report, index=False, float_format="%.4f")
    results_path = report.with_name("results.csv")
    results.to_csv(results_path, index=False, float_format="%.4f")
    files = [report, results_path]
    if plots:
        files += heatmaps(results, report.with_name(report.stem + "_heatmaps"), n_steps_by_run, labels_by_run)
    return Report(table, results, format_table(table), files, skipped)

