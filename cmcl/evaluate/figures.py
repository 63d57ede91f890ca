"""The paper's figures and Table 3 from run folders: each PNG is written with the CSV behind it.

Per (backbone, strategy), over its seeds:

* **Fig. 3a** (``*_fig3a``): stability and plasticity. Top: for every step ``i``, the deviation
  ``A[N; i] - A[i; i]`` of the alignment score (mean inner product of the test pairs' outputs,
  Definition 1) of step ``i``'s pairs after the last step ``N`` from its value right after step
  ``i`` (0 is perfect stability). Bottom: the mean over the step's updates of the higher-order term
  ``o(η)/η`` of Theorem 6 (``cmcl.train.trainer.higher_order_term``); ``<= 0`` is the theorem's
  condition for plasticity.
* **Fig. 3b** (``*_fig3b``): the batch-wise training loss (sum of the ``*_loss`` terms) over the
  whole protocol, step boundaries marked.

Across strategies: **Table 3** (``table3.csv``): seconds per training step (mean ± std over steps
and seeds), with the strategy's own per-step work in parentheses, and the device and thread count
the runs recorded; the **comparison** plot (``comparison``): final score against BWT, per backbone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cmcl.data import runs as run_files
from cmcl.evaluate.report import result_matrix


@dataclass
class RunRecords:
    """What one finished run recorded, as the figures need it."""

    run: Path
    backbone: str
    strategy: str
    seed: int
    steps: list[str]
    eval: pd.DataFrame
    losses: pd.DataFrame
    metrics: list[dict] = field(default_factory=list)


def load_records(run: Path) -> RunRecords:
    """Read a finished run folder (through :mod:`cmcl.data.runs`)."""
    header = run_files.read_json(run / "config.json")
    cfg = header["config"]
    return RunRecords(run, cfg["backbone"], cfg.get("label") or cfg["strategy"], int(cfg["seed"]),
                      list(header["protocol"]["steps"]), run_files.read_eval(run), run_files.read_losses(run),
                      run_files.read_metrics(run))


def _mean_std(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: not recorded
        mean = np.nanmean(values, axis=axis)
        std = np.nanstd(values, axis=axis, ddof=1) if values.shape[axis] > 1 else np.zeros_like(mean)
    return mean, np.nan_to_num(std)


def stability_plasticity(records: Sequence[RunRecords]) -> pd.DataFrame:
    """Fig. 3a's data: per step, the alignment deviation and the mean o(η)/η (mean and std over seeds)."""
    steps = records[0].steps
    T = len(steps)
    dev, own, final, oeta = [], [], [], []
    for r in records:
        A = result_matrix(r.eval, "align", T)          # A[trained_through, eval_step - 1]
        own.append(np.diag(A[1:, :]))                   # A[i; i]
        final.append(A[T, :])                           # A[N; i]
        dev.append(A[T, :] - np.diag(A[1:, :]))
        by_step = {m["step"]: m.get("o_eta_over_eta", np.nan) for m in r.metrics}
        oeta.append([by_step.get(i, np.nan) for i in range(1, T + 1)])
    dev_m, dev_s = _mean_std(np.array(dev, dtype=float))
    o_m, o_s = _mean_std(np.array(oeta, dtype=float))
    return pd.DataFrame({"step": range(1, T + 1), "key": steps,
                         "align_own_mean": _mean_std(np.array(own, dtype=float))[0],
                         "align_final_mean": _mean_std(np.array(final, dtype=float))[0],
                         "deviation_mean": dev_m, "deviation_std": dev_s,
                         "o_eta_over_eta_mean": o_m, "o_eta_over_eta_std": o_s, "seeds": len(records)})


def loss_curve(records: Sequence[RunRecords]) -> pd.DataFrame:
    """Fig. 3b's data: every update's total loss over the protocol (mean and std over seeds)."""
    curves = []
    for r in records:
        cols = [c for c in r.losses.columns if c.endswith("_loss")]
        curves.append(r.losses.assign(loss=r.losses[cols].sum(axis=1, min_count=1))[["step", "update", "loss"]])
    n = min(len(c) for c in curves)
    values = np.stack([c["loss"].to_numpy(dtype=float)[:n] for c in curves])
    mean, std = _mean_std(values)
    base = curves[0].iloc[:n]
    return pd.DataFrame({"batch": np.arange(n), "step": base["step"].to_numpy(), "update": base["update"].to_numpy(),
                         "loss_mean": mean, "loss_std": std, "seeds": len(records)})


def table3(records: Sequence[RunRecords]) -> pd.DataFrame:
    """Seconds per training step per (backbone, strategy, device): mean ± std over steps and seeds."""
    rows = []
    for r in records:
        for m in r.metrics:
            machine = m.get("machine") or {}
            rows.append({"backbone": r.backbone, "strategy": r.strategy, "seed": r.seed, "step": m["step"],
                         "train_seconds": m["train_seconds"], "strategy_seconds": m.get("strategy_seconds", np.nan),
                         "device": machine.get("device", "unrecorded"), "device_name": machine.get("name", ""),
                         "threads": machine.get("threads", np.nan)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    keys = ["backbone", "strategy", "device", "device_name", "threads"]
    g = frame.groupby(keys, sort=False, dropna=False)
    out = g.agg(seconds_per_step_mean=("train_seconds", "mean"), seconds_per_step_std=("train_seconds", "std"),
                strategy_seconds_mean=("strategy_seconds", "mean"), strategy_seconds_std=("strategy_seconds", "std"),
                steps=("step", "size"), seeds=("seed", "nunique")).reset_index()
    return out.fillna({"seconds_per_step_std": 0.0, "strategy_seconds_std": 0.0})


def format_table3(table: pd.DataFrame) -> str:
    """Table 3 as text: ``mean ± std (strategy's own work)`` seconds per step."""
    cells = table[["backbone", "strategy", "device", "device_name", "threads", "steps"]].copy()
    cells["s/step"] = [f"{a:.3f} ± {b:.3f} ({c:.3f})" for a, b, c in
                       zip(table["seconds_per_step_mean"], table["seconds_per_step_std"], table["strategy_seconds_mean"])]
    return cells.to_string(index=False, justify="left")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _safe(*parts: str) -> str:
    return "_".join(parts).replace("/", "_").replace(" ", "")


def plot_fig3a(data: pd.DataFrame, title: str, path: Path) -> Path:
    """Fig. 3a: alignment deviation per step (top) and mean o(η)/η per step (bottom)."""
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.7 * len(data) + 2), 7.0), sharex=True)
    x = np.arange(len(data))
    labels = [f"{s} {k.split(':')[0]} ({k.split(':')[-1]})" for s, k in zip(data["step"], data["key"])]
    dev = data["deviation_mean"].to_numpy()
    if np.isfinite(dev).any():
        colors = ["tab:red" if v < 0 else "tab:blue" for v in np.nan_to_num(dev)]
        top.bar(x, np.nan_to_num(dev), yerr=data["deviation_std"], color=colors, alpha=0.8, capsize=3)
        top.axhline(0.0, color="black", linewidth=1.0)
        top.set_ylabel("A[N; i] − A[i; i]")
    else:
        top.text(0.5, 0.5, "alignment scores not recorded by these runs", ha="center", va="center",
                 transform=top.transAxes)
    top.set_title(f"{title}\nstability: alignment of step i's test pairs after the last step minus right after step i",
                  fontsize=9)
    o = data["o_eta_over_eta_mean"].to_numpy()
    if np.isfinite(o).any():
        bottom.plot(x, o, marker="o", color="tab:green")
        bottom.fill_between(x, o - data["o_eta_over_eta_std"], o + data["o_eta_over_eta_std"], color="tab:green",
                            alpha=0.2)
        bottom.axhline(0.0, color="black", linewidth=1.0, linestyle="--")
        bottom.set_ylabel("mean o(η)/η")
    else:
        bottom.text(0.5, 0.5, "o(η)/η not recorded by these runs", ha="center", va="center",
                    transform=bottom.transAxes)
    bottom.set_title("plasticity: mean higher-order term o(η)/η of Theorem 6 per step (≤ 0: the theorem's condition)",
                     fontsize=9)
    bottom.set_xticks(x, labels, fontsize=7, rotation=35, ha="right")
    bottom.set_xlabel("step i (dataset, pair)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fig3b(data: pd.DataFrame, keys: list[str], title: str, path: Path) -> Path:
    """Fig. 3b: batch-wise training loss over the protocol, steps marked.

    The raw per-batch loss is drawn thin; a rolling median over it is drawn thick (the last,
    smaller batch of each epoch has fewer negatives and a visibly lower InfoNCE loss: the median
    keeps those dips from hiding the trend). The y range covers the 0.5-99.5th percentiles.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.6))
    x, y = data["batch"].to_numpy(), data["loss_mean"].to_numpy()
    ax.plot(x, y, color="tab:blue", linewidth=0.5, alpha=0.35, label="per batch")
    window = max(5, len(y) // 100)
    smooth = pd.Series(y).rolling(window, min_periods=1, center=True).median()
    ax.plot(x, smooth, color="tab:blue", linewidth=1.6, label=f"rolling median ({window} batches)")
    finite = y[np.isfinite(y)]
    if finite.size:
        lo, hi = np.percentile(finite, [0.5, 99.5])
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    bounds = data.groupby("step", sort=True)["batch"].agg(["min", "max"])
    for step, (start, _) in bounds.iterrows():
        if start > 0:
            ax.axvline(start - 0.5, color="grey", linewidth=0.8, linestyle=":")
    top = ax.secondary_xaxis("top")
    top.set_xticks([(a + b) / 2 for a, b in bounds.to_numpy()], [str(s) for s in bounds.index], fontsize=7)
    top.set_xlabel("step", fontsize=8)
    legend = "   ".join(f"{i + 1} {k.split(':')[0]} ({k.split(':')[-1]})" for i, k in enumerate(keys))
    fig.text(0.01, 0.01, "steps: " + legend, fontsize=6.5, color="dimgrey", wrap=True)
    ax.set_xlabel("batch (over the whole protocol)")
    ax.set_ylabel("training loss (sum of loss terms)")
    ax.set_title(f"{title}: batch-wise training loss, mean over {int(data['seeds'].iloc[0])} seed(s)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


def plot_comparison(table: pd.DataFrame, path: Path) -> Path:
    """Final score against BWT per strategy (mean ± std over seeds), per backbone."""
    plt = _plt()
    backbones = list(dict.fromkeys(table["backbone"]))
    fig, axes = plt.subplots(len(backbones), 2, figsize=(11, 4.4 * len(backbones)), squeeze=False)
    for row, backbone in zip(axes, backbones):
        t = table[table["backbone"] == backbone]
        for ax, (score, bwt, name) in zip(row, (("Acc", "BWT_A", "zero-shot Acc"), ("R@10", "BWT_R10", "R@10"))):
            for i in range(len(t)):
                s = t.iloc[i][f"{score}_mean"]
                b = t.iloc[i][f"{bwt}_mean"]
                if not (np.isfinite(s) and np.isfinite(b)):
                    continue
                ax.errorbar(b, s, xerr=t.iloc[i][f"{bwt}_std"], yerr=t.iloc[i][f"{score}_std"],
                            fmt=_MARKERS[i % len(_MARKERS)], markersize=7, capsize=3, color=f"C{i % 10}",
                            label=t.iloc[i]["strategy"], alpha=0.85)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best", title="mean ± std over seeds", title_fontsize=7)
            ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
            ax.set_xlabel(f"{bwt} (backward transfer, points; 0 = no forgetting)")
            ax.set_ylabel(f"final {name} (%)")
            ax.set_title(f"{backbone}: final {name} against {bwt}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(runs: Sequence[Path], table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every figure and Table 3 of the finished ``runs`` into ``out_dir`` (PNG and CSV each).

    Args:
        runs: finished run folders.
        table: Table 2 of those runs (:func:`cmcl.evaluate.report.table2`), for the comparison plot.
        out_dir: folder to write into.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [load_records(r) for r in runs]
    groups: dict[tuple[str, str], list[RunRecords]] = {}
    for r in records:
        groups.setdefault((r.backbone, r.strategy), []).append(r)
    written: list[Path] = []
    for (backbone, strategy), recs in groups.items():
        name = _safe(backbone, strategy)
        title = f"{backbone} / {strategy} ({len(recs)} seed(s))"
        steps = [r for r in recs if r.steps == recs[0].steps]
        data = stability_plasticity(steps)
        run_files.write_csv(out_dir / f"{name}_fig3a.csv", data, float_format="%.6g")
        written += [out_dir / f"{name}_fig3a.csv", plot_fig3a(data, title, out_dir / f"{name}_fig3a.png")]
        curve = loss_curve(steps)
        run_files.write_csv(out_dir / f"{name}_fig3b.csv", curve, float_format="%.6g")
        written += [out_dir / f"{name}_fig3b.csv", plot_fig3b(curve, steps[0].steps, f"{backbone} / {strategy}",
                                                               out_dir / f"{name}_fig3b.png")]
    t3 = table3(records)
    if not t3.empty and not table.empty:  # the order of Table 2 (the paper's)
        rank = {(b, s): i for i, (b, s) in enumerate(zip(table["backbone"], table["strategy"]))}
        t3 = t3.assign(_o=[rank.get(k, len(rank)) for k in zip(t3["backbone"], t3["strategy"])]) \
            .sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
    run_files.write_csv(out_dir / "table3.csv", t3, float_format="%.4f")
    written.append(out_dir / "table3.csv")
    if not table.empty:
        run_files.write_csv(out_dir / "comparison.csv", table, float_format="%.4f")
        written += [out_dir / "comparison.csv", plot_comparison(table, out_dir / "comparison.png")]
    return written
