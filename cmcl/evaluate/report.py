"""Reports: per-run summaries, the paper's Table 2 over runs, long-format results and heatmaps."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cmcl.evaluate.continual import backward_transfer, final_average

TABLE_METRICS = ("Acc", "BWT_A", "R@1", "R@5", "R@10", "BWT_R10")
RESULT_COLUMNS = ["run", "backbone", "strategy", "seed", "trained_through", "eval_step", "dataset", "pair",
                  "direction", "metric", "value"]


def result_matrix(rows: pd.DataFrame, metric: str, n_steps: int, direction: str | None = None) -> np.ndarray:
    """The (T + 1, T) matrix ``R[i, j]`` of one metric (NaN where it does not apply or is missing).

    Row ``i`` is "trained through step i" (0: before training), column ``j - 1`` is "scored on step
    j's test split".

    Args:
        rows: long-format eval rows of one run.
        metric: ``"R@1"``, ``"R@5"``, ``"R@10"`` or ``"acc"``.
        n_steps: T.
        direction: for recall, ``"mean"`` (default), ``"a2b"`` or ``"b2a"``.
    """
    sel = rows[rows["metric"] == metric]
    if metric != "acc":
        sel = sel[sel["direction"] == (direction or "mean")]
    grid = sel.pivot_table(index="trained_through", columns="eval_step", values="value", aggfunc="last")
    return grid.reindex(index=range(n_steps + 1), columns=range(1, n_steps + 1)).to_numpy(dtype=float)


def summarize_run(rows: pd.DataFrame, n_steps: int) -> dict[str, float]:
    """Table-2 numbers of one finished run: final Acc, BWT_A, R@1/5/10 (direction mean), BWT_R10."""
    acc = result_matrix(rows, "acc", n_steps)
    r10 = result_matrix(rows, "R@10", n_steps)
    return {
        "Acc": final_average(acc), "BWT_A": backward_transfer(acc),
        "R@1": final_average(result_matrix(rows, "R@1", n_steps)),
        "R@5": final_average(result_matrix(rows, "R@5", n_steps)),
        "R@10": final_average(r10), "BWT_R10": backward_transfer(r10),
    }


def table2(summaries: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Aggregate per-run summaries into Table 2: mean and std (ddof=1) over seeds, plus n.

    Args:
        summaries: one row per run with ``backbone``, ``strategy`` and the ``TABLE_METRICS``.
        order: strategy order (the paper's); others follow alphabetically.
    """
    if summaries.empty:
        return pd.DataFrame()
    groups = summaries.groupby(["backbone", "strategy"], sort=False)[list(TABLE_METRICS)]
    stats = groups.agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats[[f"{m}_std" for m in TABLE_METRICS]] = stats[[f"{m}_std" for m in TABLE_METRICS]].fillna(0.0)  # one seed
    table = stats.assign(n=groups.size()).reset_index()
    table = table[["backbone", "strategy", "n", *stats.columns]]
    rank = {s: i for i, s in enumerate(order or [])}
    base = table["strategy"].str.split("[", n=1, regex=False).str[0]
    return (table.assign(_o=base.map(rank).fillna(len(rank)))
            .sort_values(["backbone", "_o", "strategy"]).drop(columns="_o").reset_index(drop=True))


def format_table(table: pd.DataFrame) -> str:
    """Table 2 as aligned text with ``mean ± std`` cells."""
    cells = table[["backbone", "strategy", "n"]].astype({"n": int})
    for m in TABLE_METRICS:
        cells[m] = [("—" if np.isnan(a) else f"{a:.2f} ± {b:.2f}") for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])]
    width = {c: max([len(c), *(len(str(v)) for v in cells[c])]) for c in cells}
    return cells.to_string(index=False, justify="left",
                           formatters={c: (lambda w: lambda v: f"{v!s:<{w}}")(width[c]) for c in cells})


def heatmaps(results: pd.DataFrame, out_dir: Path, n_steps_by_run: dict[str, int],
             step_labels: dict[str, list[str]]) -> list[Path]:
    """PNG heatmaps of the mean R@10 and Acc matrices per (backbone, strategy); returns the files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for (backbone, strategy), grp in results.groupby(["backbone", "strategy"], sort=False):
        for metric in ("R@10", "acc"):
            mats = []
            labels = None
            for run, rows in grp.groupby("run"):
                T = n_steps_by_run[run]
                mats.append(result_matrix(rows, metric, T))
                labels = step_labels[run]
            if not mats or all(np.isnan(m).all() for m in mats):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: metric not applicable
                M = np.nanmean(np.stack(mats), axis=0)
            fig, ax = plt.subplots(figsize=(1.0 + 0.55 * M.shape[1], 1.0 + 0.45 * M.shape[0]))
            im = ax.imshow(M, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(M):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
            ax.set_xticks(range(M.shape[1]), labels, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(M.shape[0]), ["init"] + [str(i) for i in range(1, M.shape[0])], fontsize=7)
            ax.set_xlabel("evaluated on step")
            ax.set_ylabel("trained through step")
            name = "R@10 (mean of both directions)" if metric == "R@10" else "zero-shot Acc"
            ax.set_title(f"{backbone} / {strategy}: {name}, mean over {len(mats)} seed(s)", fontsize=8)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            safe = f"{backbone}_{strategy}_{'R10' if metric == 'R@10' else 'acc'}".replace("/", "_")
            path = out_dir / f"{safe}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
