"""The application layer: wires training to scoring and run folders to reports.

``cmcl.train`` and ``cmcl.evaluate`` never import each other; this module (and the CLI above it)
is where they meet. :func:`train_runs` validates a whole sweep and trains it, scoring each step
with :class:`cmcl.evaluate.evaluator.Scorer`; :func:`report` aggregates run folders into Table 2,
re-scoring runs from their checkpoints when another recall protocol is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmcl.data import runs as run_files
from cmcl.data.paired import StepData
from cmcl.data.protocol import load_protocol
from cmcl.errors import ConfigError
from cmcl.evaluate.evaluator import Embed, EvalSettings, Scorer
from cmcl.evaluate.report import summarize_run
from cmcl.evaluate.runs import Report, report_runs
from cmcl.train.config import TrainConfig, make_label
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import PAPER_ORDER, resolve_params
from cmcl.train.trainer import RunPlan, Score, plan_run, train_run

log = logging.getLogger("cmcl")
logger = log


def embedder(learners: ModalityLearners) -> Embed:
    """``embed(modality, x)`` through ``learners`` (numpy in, float32 numpy out, no autograd)."""
    device = next(learners.parameters()).device

    def embed(modality: str, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return learners(modality, torch.as_tensor(x, device=device)).float().cpu().numpy()
    return embed


def step_scorer(plan: RunPlan) -> Score:
    """The scorer :func:`cmcl.train.trainer.train_run` calls after each step.

    It compares every learner with its state at the previous call, so a test split whose scored
    modalities' learners are all bit-identical keeps its rows (same outputs, same metrics) and only
    the rest is re-embedded and re-scored.
    """
    cfg = plan.cfg
    scorer = Scorer(plan.data.test_sets(), EvalSettings(cfg.recall_protocol, cfg.pool_size, cfg.pool_count,
                                                        cfg.eval_seed, use_gpu=cfg.device.startswith("cuda")))
    last: dict[str, list[torch.Tensor]] = {}

    def score(learners: ModalityLearners, trained_through: int) -> list[dict]:
        now = {m: [p.detach().clone() for p in learners[m].parameters()] for m in learners.modalities}
        changed = None if not last else {m for m in now if not all(map(torch.equal, now[m], last[m]))}
        last.clear()
        last.update(now)
        return scorer(embedder(learners), trained_through, changed)
    return score


def write_summary(run: Path) -> dict[str, float]:
    """``summary.json``: the run's Table-2 numbers (from its stored eval rows)."""
    steps = run_files.read_json(run / "config.json")["protocol"]["steps"]
    summary = summarize_run(run_files.read_eval(run), len(steps))
    run_files.write_json(run / "summary.json", summary)
    return summary


def train_runs(features: Path, backbone: str, strategies: Sequence[str], seeds: Sequence[int], runs: Path,
               protocol: str, overrides: dict[str, dict[str, Any]], *, label: str | None = None,
               resume: bool = False, overwrite: bool = False, device: str = "cpu", progress: bool = False,
               keep_states: str = "last", grid: dict[str, dict[str, list[Any]]] | None = None, jobs: int = 1,
               threads: int | None = None, log: Sequence[str] = (), launcher: str | None = None,
               cluster: Any = None, wait: bool = False, **settings: Any) -> list[Path]:
    """Train the strategy x grid x seed runs of a sweep; returns their folders.

    Every run is validated (options, strategy parameters, protocol, feature files) before any is
    started, so a bad value never leaves a run folder behind. ``grid`` maps a strategy to
    ``{parameter: [values]}``: one run series per combination, labelled by its values (with the
    ``overrides``). Runs are trained in ``jobs`` processes (:func:`cmcl.sweep.run_sweep`), each with
    ``threads`` torch threads; a run that fails does not stop the others: the sweep ends with
    :class:`cmcl.sweep.SweepFailed` listing them (a sweep of one run raises its own error). ``log``
    names loggers (:mod:`cmcl.loggers`) that receive each step's records. With a ``launcher``
    (``slurm`` or ``local``, :mod:`cmcl.launch`) the validated runs are submitted as jobs instead
    (``cluster``: a :class:`cmcl.launch.ClusterOptions`); with ``wait`` the call returns when they end.
    """
    from cmcl.loggers import check_loggers
    from cmcl.sweep import SweepFailed, expand_grid, run_sweep

    check_loggers(list(log))

    combos = {name: expand_grid((grid or {}).get(name, {})) for name in strategies}
    if label and sum(len(c) for c in combos.values()) > 1:
        raise ConfigError("--label names one run series; use it with a single --strategy and no --grid")
    proto = load_protocol(protocol)
    plans: list[RunPlan] = []
    data: StepData | None = None
    for name in strategies:
        for combo in combos[name]:
            chosen = {**overrides.get(name, {}), **combo}
            resolved = resolve_params(name, chosen, backbone)
            for seed in seeds:
                cfg = TrainConfig(features=str(features), backbone=backbone, strategy=name, params=resolved,
                                  label=label or make_label(name, chosen), seed=seed, protocol=protocol,
                                  protocol_sha256=proto.sha256, device=device, **settings)
                plans.append(plan_run(cfg, data))
                data = plans[-1].data
    by_cfg = {id(p.cfg): p for p in plans}
    options = {"runs": runs, "resume": resume, "overwrite": overwrite, "keep_states": keep_states,
               "loggers": list(log)}

    def train(cfg: TrainConfig) -> tuple[Path, dict[str, float]]:
        logger.info("training %s seed %d on %s/%s (%d steps, device %s)", cfg.label, cfg.seed, features, backbone,
                    len(proto), device)
        return _train_logged(by_cfg[id(cfg)], runs, list(log), resume=resume, overwrite=overwrite,
                             keep_states=keep_states, progress=progress)

    if launcher:
        from cmcl.launch import ClusterOptions, submit

        submit([p.cfg for p in plans], runs, launcher=launcher, cluster=cluster or ClusterOptions(),
               options={"keep_states": keep_states, "loggers": list(log)}, wait=wait)
        return [run_files.run_dir(runs, p.cfg.backbone, p.cfg.label or p.cfg.strategy, p.cfg.seed) for p in plans]
    outcomes = run_sweep([p.cfg for p in plans], train, jobs=jobs, threads=threads,
                         worker_train="cmcl.pipeline:train_config", worker_options=options)
    failed = [o for o in outcomes if not o.ok]
    if failed and len(outcomes) == 1 and failed[0].exc is not None:
        raise failed[0].exc  # one run: its own error, as before
    if failed:
        raise SweepFailed(failed, len(outcomes))
    return [o.run for o in outcomes]


_DATA_CACHE: dict[tuple[str, str, str], StepData] = {}


def _train_logged(plan: RunPlan, runs: Path, loggers: list[str], **kwargs: Any) -> tuple[Path, dict[str, float]]:
    """Train one planned run, its steps sent to ``loggers``; returns the folder and its summary."""
    from cmcl.loggers import RunLoggers

    on_step = RunLoggers(loggers) if loggers else None
    run = train_run(plan, runs, score=step_scorer(plan), on_step=on_step, **kwargs)
    summary = write_summary(run)
    if on_step is not None:
        on_step.close(run, summary)
    return run, summary


def train_config(cfg: TrainConfig, *, runs: Path, resume: bool = False, overwrite: bool = False,
                 keep_states: str = "last", loggers: Sequence[str] = ()) -> tuple[Path, dict[str, float]]:
    """Validate and train one configuration in a worker process (features loaded once per worker)."""
    key = (cfg.features, cfg.backbone, cfg.protocol_sha256)
    plan = plan_run(cfg, _DATA_CACHE.get(key))
    _DATA_CACHE.clear()
    _DATA_CACHE[key] = plan.data
    return _train_logged(plan, runs, list(loggers), resume=resume, overwrite=overwrite, keep_states=keep_states,
                         progress=False)


def rescore_run(run: Path, settings: EvalSettings, device: str = "cpu", features: str | None = None) -> pd.DataFrame:
    """Re-evaluate every finished step of a run from its checkpoints with other eval settings."""
    cfg = run_files.read_json(run / "config.json")["config"]
    protocol = load_protocol(cfg["protocol"])
    data = StepData(features or cfg["features"], cfg["backbone"], protocol)
    scorer = Scorer(data.test_sets(), settings)
    learners = ModalityLearners(protocol.modalities, data.dim, device=device)
    initial = {k: v.clone() for k, v in learners.state_dict().items()}
    rows: list[dict] = []
    for i in run_files.finished_steps(run):
        if i == 0:
            learners.load_state_dict(initial)
        else:
            learners.load_state_dict(initial)  # a modality new in an extended protocol: identity before its step
            used = {m for step in protocol.steps[:i] for m in step.modalities}
            run_files.load_learners(run_files.step_dir(run, i) / "learners.safetensors", learners,
                                    absent_ok=set(protocol.modalities) - used)
        rows += scorer(embedder(learners), i)
    return pd.DataFrame(rows)


def report(runs: Path, report_path: Path, *, recall_protocol: str = "paper", device: str = "cpu",
           features: str | None = None, plots: bool = True, figures: bool = False, rescore: bool = False) -> Report:
    """Table 2 of every complete run under ``runs`` (what ``cmcl evaluate`` does)."""
    def rescore_one(run: Path, settings: EvalSettings) -> pd.DataFrame:
        use_gpu = device.startswith("cuda")
        return rescore_run(run, EvalSettings(settings.recall_protocol, settings.pool_size, settings.pool_count,
                                             settings.seed, use_gpu=use_gpu), device, features)

    return report_runs(runs, report_path, recall_protocol=recall_protocol, rescore=rescore_one,
                       order=PAPER_ORDER, plots=plots, figures=figures, rescore_all=rescore)


def train_one(cfg: TrainConfig, runs: Path, **kwargs: Any) -> Path:
    """Validate, train and summarise one run (:func:`train_runs` for a single configuration)."""
    plan = plan_run(cfg)
    run = train_run(plan, runs, score=step_scorer(plan), **kwargs)
    write_summary(run)
    return run
