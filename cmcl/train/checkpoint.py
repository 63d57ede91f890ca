"""Run directories and per-step checkpoints.

A run lives at ``<runs>/<backbone>/<label>/seed-<seed>/``::

    config.json           resolved TrainConfig + cmcl version, git sha, protocol, feature files
    step-00/eval.csv      evaluation before any training
    step-01/              one folder per finished step, renamed into place atomically
        learners.safetensors   every learner's weight and bias
        strategy.pt            the strategy's state (torch.save; loaded with weights_only=True);
                               kept for the last finished step only unless keep_states="all"
        eval.csv               row 1 of the result matrices (long format)
        losses.csv             per-batch loss terms
        metrics.json           step summary: sizes, timings, mean losses, strategy report
    results.csv           all eval rows with run columns, written when the run completes

A step folder exists only once all its files are written (``step-NN.tmp`` is renamed), so the
last ``step-NN`` is always a consistent point to resume from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from cmcl.errors import RunError
from cmcl.train.learners import ModalityLearners

_STEP_RE = re.compile(r"^step-(\d{2,})$")
EVAL_COLUMNS = ["trained_through", "eval_step", "dataset", "pair", "direction", "metric", "value"]


def run_dir(runs: str | Path, backbone: str, label: str, seed: int) -> Path:
    """Folder of one run."""
    return Path(runs) / backbone / label / f"seed-{seed}"


def step_dir(run: Path, index: int) -> Path:
    """Folder of one finished step."""
    return run / f"step-{index:02d}"


def finished_steps(run: Path) -> list[int]:
    """Indices of the finished steps (0 = the pre-training evaluation), ascending."""
    if not run.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name)))


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``; on any failure (a full disk, say) no file is left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically."""
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically."""
    _atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def read_json(path: Path) -> Any:
    """Read JSON, naming the file on failure."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None


def write_step(run: Path, index: int, *, learners: ModalityLearners | None, strategy_state: dict | None,
               eval_rows: list[dict], losses: pd.DataFrame | None = None, metrics: dict | None = None) -> Path:
    """Write a finished step's folder atomically (files into ``step-NN.tmp``, then rename)."""
    final = step_dir(run, index)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        if learners is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in learners.state_dict().items()}
            save_file(state, str(tmp / "learners.safetensors"))
        if strategy_state is not None:
            torch.save(strategy_state, tmp / "strategy.pt")
        pd.DataFrame(eval_rows, columns=EVAL_COLUMNS).to_csv(tmp / "eval.csv", index=False)
        if losses is not None:
            losses.to_csv(tmp / "losses.csv", index=False)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # a full disk, say: no half-written step is left, the previous steps stay usable
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_learners(path: Path, learners: ModalityLearners) -> None:
    """Load ``learners.safetensors`` into ``learners`` (strict)."""
    try:
        state = load_file(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise RunError(f"{path}: cannot read learners ({exc})") from None
    device = next(learners.parameters()).device
    missing, unexpected = learners.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RunError(f"{path}: learner keys do not match (missing {missing}, unexpected {unexpected})")


def load_strategy_state(path: Path) -> dict:
    """Load a strategy state saved by :func:`write_step` (safe: ``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: missing (the strategy state of the last finished step is needed to resume)") from None
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise RunError(f"{path}: cannot load strategy state ({type(exc).__name__}: {exc})") from None


def read_eval(run: Path) -> pd.DataFrame:
    """Every finished step's eval rows of a run, in step order."""
    frames = []
    for i in finished_steps(run):
        path = step_dir(run, i) / "eval.csv"
        try:
            frames.append(pd.read_csv(path))
        except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise RunError(f"{path}: cannot read ({exc})") from None
    if not frames:
        return pd.DataFrame(columns=EVAL_COLUMNS)
    return pd.concat(frames, ignore_index=True)
