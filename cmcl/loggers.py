"""Experiment loggers: TensorBoard and Weights & Biases, thin adapters over a run's own files.

The run folder stays the source of truth. After each step folder is written, a logger reads the
step's records back through :mod:`cmcl.data.runs` (``losses.csv``: every update's loss terms and
o(η)/η; ``metrics.json``: timings, mean losses, the strategy's report; ``eval.csv``: every split's
metrics) and sends them on; the run's configuration goes along as hyperparameters, and the run's
Table-2 numbers (``summary.json``) when it ends.

* ``tensorboard`` (extra ``[tensorboard]``): event files in ``RUN/tensorboard/``.
* ``wandb`` (extra ``[wandb]``): offline by default (files in ``RUN/wandb/``, upload later with
  ``wandb sync``); ``WANDB_MODE=online`` (after ``wandb login``) streams to the service.
  ``WANDB_PROJECT`` names the project (default ``cmcl``).

Scalar names: ``train/<term>`` per update (x: the update's index over the whole protocol),
``step/<name>`` per step (x: the step index), ``eval/<dataset>/<metric>`` per step (recall: mean
of both directions), ``summary/<metric>`` at the end.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from cmcl.data import runs as run_files
from cmcl.errors import ConfigError

LOGGERS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(names: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` for an unknown logger or one whose package is not installed."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--log {name!r}: unknown logger; choose from {', '.join(LOGGERS)}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"--log {name} needs the {_PACKAGES[name]} package: pip install 'cmcl[{name}]'")


def flat_config(run: Path) -> dict[str, Any]:
    """The run's configuration as flat ``key: scalar`` hyperparameters (``params.<name>`` for the strategy's)."""
    cfg = dict(run_files.read_json(run / "config.json")["config"])
    params = cfg.pop("params", {}) or {}
    out = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))}
    out.update({f"params.{k}": (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                for k, v in params.items()})
    return out


def step_records(run: Path, index: int) -> tuple[list[tuple[int, dict[str, float]]], dict[str, float]]:
    """What a logger sends for step ``index``: ``(update, scalars)`` per update, and the step's scalars."""
    step = run_files.step_dir(run, index)
    per_step: dict[str, float] = {}
    eval_rows = run_files.read_eval_step(run, index)
    for r in eval_rows.itertuples(index=False):
        if r.direction in ("mean", "zero-shot"):
            per_step[f"eval/{r.dataset}/{r.metric}"] = float(r.value)
    if index == 0:
        return [], per_step
    metrics = run_files.read_json(step / "metrics.json")
    for key in ("train_seconds", "strategy_seconds", "eval_seconds", "o_eta_over_eta", "updates", "n_train"):
        if key in metrics:
            per_step[f"step/{key}"] = float(metrics[key])
    per_step.update({f"step/{k}": float(v) for k, v in metrics.get("mean_losses", {}).items()})
    per_step.update({f"step/{k}": float(v) for k, v in metrics.get("report", {}).items()
                     if isinstance(v, (int, float))})
    offset = sum(int(m.get("updates", 0)) for m in run_files.read_metrics(run) if m["step"] < index)
    losses = run_files.read_step_losses(run, index)
    cols = [c for c in losses.columns if c.endswith("_loss") or c == "o_eta_over_eta"]
    updates = []
    for row in losses[["update", *cols]].itertuples(index=False):
        values = {f"train/{c}": float(v) for c, v in zip(cols, row[1:]) if not math.isnan(float(v))}
        updates.append((offset + int(row[0]), values))
    return updates, per_step


class _TensorBoard:
    def __init__(self, run: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(flat_config(run), indent=2, sort_keys=True) + "\n```")

    def step(self, index: int) -> None:
        updates, per_step = step_records(self.run, index)
        for x, values in updates:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, x)
        for tag, v in per_step.items():
            self.writer.add_scalar(tag, v, index)
        self.writer.flush()

    def close(self, summary: dict[str, float] | None) -> None:
        if summary:
            clean = {f"summary/{k}": float(v) for k, v in summary.items() if v is not None and math.isfinite(v)}
            self.writer.add_hparams(flat_config(self.run), clean, run_name="hparams")
        self.writer.close()


class _WandB:
    def __init__(self, run: Path) -> None:
        import wandb

        cfg = flat_config(run)
        self.wandb = wandb
        self.run = run
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.handle = wandb.init(project=os.environ.get("WANDB_PROJECT", "cmcl"), dir=str(run), mode=mode,
                                 config=cfg, name=f"{cfg.get('backbone')}/{cfg.get('label')}/seed-{cfg.get('seed')}",
                                 reinit=True)
        self.handle.define_metric("train/*", step_metric="update")
        self.handle.define_metric("step/*", step_metric="step")
        self.handle.define_metric("eval/*", step_metric="step")

    def step(self, index: int) -> None:
        updates, per_step = step_records(self.run, index)
        for x, values in updates:
            self.handle.log({"update": x, **values})
        self.handle.log({"step": index, **per_step})

    def close(self, summary: dict[str, float] | None) -> None:
        if summary:
            for k, v in summary.items():
                self.handle.summary[f"summary/{k}"] = v
        self.handle.finish()


class RunLoggers:
    """``on_step`` for :func:`cmcl.train.trainer.train_run`: opens the loggers of a run on its first
    written step and sends every step's records; :meth:`close` ends them with the run's summary."""

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        check_loggers(names)
        self.names = list(names)
        self.open: dict[Path, list[Any]] = {}

    def __call__(self, run: Path, index: int) -> None:
        if run not in self.open:
            self.open[run] = [_TensorBoard(run) if n == "tensorboard" else _WandB(run) for n in self.names]
        for logger in self.open[run]:
            logger.step(index)

    def close(self, run: Path, summary: dict[str, float] | None = None) -> None:
        for logger in self.open.pop(run, []):
            logger.close(summary)
