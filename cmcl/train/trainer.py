"""The training loop: the only place that zeroes gradients, back-propagates, clips and steps.

:func:`fit_step` trains one protocol step; :func:`train_run` runs a whole protocol for one strategy
and seed into a run directory (resumable); strategies plug in through the hooks of
:class:`cmcl.train.strategies.base.Strategy` and the loop never branches on a method or a step.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cmcl import __version__
from cmcl.data import locks
from cmcl.data.features import FeatureShard, split_files
from cmcl.data.paired import PairedFeatures, StepData, iter_batches
from cmcl.data.protocol import Protocol, load_protocol
from cmcl.errors import RunError
from cmcl.evaluate.evaluator import EvalSettings, evaluate
from cmcl.evaluate.report import summarize_run
from cmcl.train import checkpoint as ckpt
from cmcl.train.config import Harness, TrainConfig
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective, Strategy
from cmcl.types import StepInfo

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step index, purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def build_optimizer(learners: ModalityLearners, h: Harness) -> torch.optim.Optimizer:
    """A fresh optimizer over every learner (learners without a gradient are skipped by it)."""
    weights = [p for name, p in learners.named_parameters() if not name.endswith("bias")]
    biases = [p for name, p in learners.named_parameters() if name.endswith("bias")]
    groups = [{"params": weights, "weight_decay": h.weight_decay},
              {"params": biases, "weight_decay": h.weight_decay if h.decay_bias else 0.0}]
    if h.optimizer == "sgd":
        # Decoupled weight decay, as AdamW's, so the two optimizers differ only in the step rule.
        return _DecoupledSGD(groups, lr=h.lr)
    # The fused kernel makes one pass over each parameter (CPU and CUDA); same update rule.
    return torch.optim.AdamW(groups, lr=h.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


class _DecoupledSGD(torch.optim.SGD):
    """Plain SGD with AdamW-style decoupled weight decay (``p -= lr * wd * p``)."""

    def __init__(self, groups, lr: float) -> None:
        wds = [g.pop("weight_decay") for g in groups]
        super().__init__(groups, lr=lr)
        for g, wd in zip(self.param_groups, wds):
            g["decoupled_wd"] = wd

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (same contract as torch.optim.SGD.step)
        for g in self.param_groups:
            if g["decoupled_wd"]:
                for p in g["params"]:
                    if p.grad is not None:
                        p.mul_(1 - g["lr"] * g["decoupled_wd"])
        return super().step(closure)


@dataclass
class StepResult:
    """What :func:`fit_step` measured."""

    losses: pd.DataFrame
    updates: int
    seconds: float


def fit_step(learners: ModalityLearners, strategy: Strategy, step: StepInfo, data: PairedFeatures, *,
             harness: Harness, epochs: int, batch_size: int, progress: bool = False) -> StepResult:
    """Train one step: hooks, a fresh optimizer and scheduler, ``epochs`` passes over the batches."""
    step = dataclasses.replace(step, clip_norm=harness.clip_norm)
    start = time.perf_counter()  # the whole step, the strategy's per-step work included
    strategy.before_step(step, data)
    train = strategy.training_set(step, data)
    n = len(train)
    per_epoch = -(-n // batch_size)
    total = per_epoch * epochs
    opt = build_optimizer(learners, harness)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda u: max(0.0, (total - u) / total)) if harness.linear_decay else (lambda u: 1.0))
    params = [p for p in learners.parameters()]
    gen = torch.Generator().manual_seed(derive_seed(step.seed, 1))
    records: list[dict[str, torch.Tensor]] = []
    bar = tqdm(total=total, desc=f"step {step.index} {step.key}", unit="upd", leave=False,
               disable=not progress, mininterval=0.5)
    for epoch in range(epochs):
        for rows in iter_batches(n, batch_size, gen):
            batch = train.select(rows)

            def closure():
                learners.zero_grad(set_to_none=True)
                out = learners.forward_pairs(batch)
                losses = strategy.losses(batch, out)
                total_loss = sum(v for k, v in losses.items() if k.endswith("_loss"))
                total_loss.backward()
                return losses, out

            losses, out = strategy.compute_gradients(closure)
            if harness.clip_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], harness.clip_norm)
                # the factor clip_grad_norm_ applied (same formula), for hooks that need raw gradients
                out.grad_scale = min(1.0, harness.clip_norm / (float(norm) + 1e-6))
            strategy.before_update(batch, out)
            opt.step()
            sched.step()
            strategy.after_update(batch, out)
            records.append({k: v.detach() for k, v in losses.items()})
            bar.update(1)
    bar.close()
    keys = sorted({k for r in records for k in r})
    table = {k: torch.stack([r.get(k, torch.tensor(float("nan"))).float().cpu() for r in records]).numpy()
             for k in keys}
    frame = pd.DataFrame({"epoch": np.repeat(np.arange(epochs), per_epoch)[:len(records)],
                          "update": np.arange(len(records)), **table})
    strategy.after_step(step, data)
    return StepResult(frame, len(records), time.perf_counter() - start)


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def feature_fingerprint(cfg: TrainConfig, protocol: Protocol) -> dict[str, Any]:
    """Which feature files a run was trained on: name, creation stamp, rows, size and modification time.

    The size and modification time catch a file edited in place; a copied cache keeps its
    fingerprint when the copy keeps modification times (``cp -a``, ``rsync -a``).
    """
    out = {}
    for dataset in protocol.datasets:
        for split in ("train", "test"):
            files = split_files(cfg.features, cfg.backbone, dataset, split)
            stamps = []
            for f in files:
                with FeatureShard(f) as shard:
                    st = f.stat()
                    stamps.append(f"{f.name}@{shard.meta.created_utc}:{len(shard)}:{st.st_size}:{st.st_mtime_ns}")
            out[f"{dataset}/{split}"] = stamps
    return out


def _random_weight_warning(cfg: TrainConfig, protocol: Protocol) -> None:
    for dataset in protocol.datasets:
        with FeatureShard(split_files(cfg.features, cfg.backbone, dataset, "train")[0]) as shard:
            rw = shard.meta.extra.get("random_weights", "")
            if rw:
                log.warning("%s: features were extracted with randomly initialised weights (%s); "
                            "numbers are meaningless except as a smoke test", shard.path, rw)
                return


@dataclass
class RunPlan:
    """A configuration checked against everything it needs, before anything is written.

    Built by :func:`plan_run`: the protocol, the feature files (every split the protocol reads is
    opened and validated), and the strategy with its parameters. ``data`` may be shared by the plans
    of one sweep (same cache, backbone and protocol), so the features are validated and loaded once.
    """

    cfg: TrainConfig
    protocol: Protocol
    data: StepData
    fingerprint: dict[str, Any]


def plan_run(cfg: TrainConfig, data: StepData | None = None) -> RunPlan:
    """Validate ``cfg`` (protocol, feature files, strategy parameters, harness) without writing anything."""
    protocol = load_protocol(cfg.protocol)
    if cfg.protocol_sha256 and cfg.protocol_sha256 != protocol.sha256:
        raise RunError(f"protocol {cfg.protocol} changed since the config was made")
    get_strategy(cfg.strategy, backbone=None, **cfg.params)  # parameter ranges: raises ConfigError
    cfg.resolved_harness()
    if data is None or (data.root, data.backbone, data.protocol.sha256) != (Path(cfg.features), cfg.backbone,
                                                                            protocol.sha256):
        data = StepData(cfg.features, cfg.backbone, protocol)
    data.check()
    return RunPlan(cfg, protocol, data, feature_fingerprint(cfg, protocol))


def _prepare_folder(plan: RunPlan, run: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``run`` ready to train into (the caller holds its lock); refuse what would lose work."""
    cfg = plan.cfg
    config_path = run / "config.json"
    if run.exists() and overwrite:
        shutil.rmtree(run)
    if config_path.exists():
        trained = [i for i in ckpt.finished_steps(run) if i >= 1]
        if not trained:  # a run that never finished a step (a failed start): a plain retry restarts it
            log.info("%s: no finished step; starting it afresh", run)
            shutil.rmtree(run)
        elif not resume:
            raise RunError(f"{run} already exists; pass --resume to continue it or --overwrite to start over")
        else:
            old = ckpt.read_json(config_path)
            old_cfg = dict(old.get("config", {}))
            old_cfg.pop("device", None)
            diff = sorted(k for k in set(old_cfg) | set(cfg.identity())
                          if old_cfg.get(k) != cfg.identity().get(k))
            if diff:
                raise RunError(f"{run}: --resume with a different configuration (differs in {', '.join(diff)}); "
                               f"use another --runs folder or --overwrite")
            before = old.get("features") or {}
            changed = sorted(k for k in set(before) | set(plan.fingerprint) if before.get(k) != plan.fingerprint.get(k))
            if changed:
                raise RunError(f"{run}: --resume but the feature files changed since the run started "
                               f"({', '.join(changed)} under {cfg.features}/{cfg.backbone})")
    elif run.exists() and any(run.iterdir()):
        raise RunError(f"{run} exists but has no config.json; remove it or pass --overwrite")
    run.mkdir(parents=True, exist_ok=True)
    for tmp in run.glob("*.tmp"):  # leftovers of a step that was killed while being written
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if not config_path.exists():
        protocol = plan.protocol
        ckpt.write_json(config_path, {
            "config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "features": plan.fingerprint,
            "protocol": {"name": protocol.name, "source": protocol.source, "sha256": protocol.sha256,
                         "steps": [s.key for s in protocol.steps]},
            "cmcl_version": __version__, "git_sha": _git_sha(), "torch": torch.__version__,
            "python": platform.python_version()})


def train_run(cfg: TrainConfig | RunPlan, runs: str | Path, *, resume: bool = False, overwrite: bool = False,
              keep_states: str = "last", progress: bool = False) -> Path:
    """Run the whole protocol for one strategy and seed; returns the run directory.

    Everything is validated (:func:`plan_run`) before the run folder is touched, and the folder is
    locked while the run writes it: a second process on the same run fails at once.

    Args:
        cfg: the resolved configuration, or a plan made from it by :func:`plan_run`.
        runs: root of run directories.
        resume: continue a run from its last finished step (its config must match). A run folder
            with no finished step is restarted without it.
        overwrite: delete an existing run directory first.
        keep_states: ``"last"`` keeps the strategy state of the last finished step only (enough to
            resume or append steps); ``"all"`` keeps every step's.
        progress: show progress bars.
    """
    plan = cfg if isinstance(cfg, RunPlan) else plan_run(cfg)
    run = ckpt.run_dir(runs, plan.cfg.backbone, plan.cfg.label or plan.cfg.strategy, plan.cfg.seed)
    with locks.exclusive(run, "run folder"):
        _prepare_folder(plan, run, resume=resume, overwrite=overwrite)
        return _train_locked(plan, run, keep_states=keep_states, progress=progress)


def _train_locked(plan: RunPlan, run: Path, *, keep_states: str, progress: bool) -> Path:
    cfg, protocol, data = plan.cfg, plan.protocol, plan.data
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    _random_weight_warning(cfg, protocol)
    test_sets = data.test_sets()
    learners = ModalityLearners(protocol.modalities, data.dim).to(device)
    strategy = get_strategy(cfg.strategy, backbone=None, **cfg.params)
    strategy.setup(learners, Objective(cfg.temperature, cfg.loss))
    settings = EvalSettings(cfg.recall_protocol, cfg.pool_size, cfg.pool_count, cfg.eval_seed)
    h = cfg.resolved_harness()

    done = ckpt.finished_steps(run)
    last = done[-1] if done else -1
    if last > len(protocol):
        raise RunError(f"{run}: has step {last} but the protocol has {len(protocol)} steps")
    if last >= 1:
        ckpt.load_learners(ckpt.step_dir(run, last) / "learners.safetensors", learners)
        strategy.load_state_dict(ckpt.load_strategy_state(ckpt.step_dir(run, last) / "strategy.pt"))
        log.info("%s: resuming after step %d", run, last)
    if last < 0:
        ckpt.write_step(run, 0, learners=None, strategy_state=None,
                        eval_rows=evaluate(learners, test_sets, 0, settings))
    for step in protocol.steps[max(last, 0):]:
        info = StepInfo(step.index, step.dataset, step.modalities, derive_seed(cfg.seed, step.index))
        train = data.train(step).to(device)
        result = fit_step(learners, strategy, info, train, harness=h, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, progress=progress)
        t0 = time.perf_counter()
        rows = evaluate(learners, test_sets, step.index, settings)
        metrics = {"step": step.index, "dataset": step.dataset, "pair": step.pair, "n_train": len(train),
                   "updates": result.updates, "train_seconds": result.seconds,
                   "eval_seconds": time.perf_counter() - t0,
                   "mean_losses": {k: float(np.nanmean(result.losses[k])) for k in result.losses.columns
                                   if k.endswith("_loss")},
                   "report": strategy.report()}
        ckpt.write_step(run, step.index, learners=learners, strategy_state=strategy.state_dict(),
                        eval_rows=rows, losses=result.losses, metrics=metrics)
        if keep_states == "last":
            (ckpt.step_dir(run, step.index - 1) / "strategy.pt").unlink(missing_ok=True)
        log.info("%s step %d/%d %s: %.1fs, loss %.4f", cfg.label or cfg.strategy, step.index, len(protocol),
                 step.key, result.seconds, sum(metrics["mean_losses"].values()))
        del train
    frame = ckpt.read_eval(run)
    frame.insert(0, "seed", cfg.seed)
    frame.insert(0, "strategy", cfg.label or cfg.strategy)
    frame.insert(0, "backbone", cfg.backbone)
    frame.insert(0, "run", str(run))
    ckpt.write_csv(run / "results.csv", frame)
    ckpt.write_json(run / "summary.json", summarize_run(ckpt.read_eval(run), len(protocol)))
    return run
