"""The training loop: the only place that zeroes gradients, back-propagates, clips and steps.

:func:`fit_step` trains one protocol step; :func:`train_run` runs a whole protocol for one strategy
and seed into a run directory (resumable), calling the scorer it is given after each step (this
package never imports :mod:`cmcl.evaluate`); strategies plug in through the hooks of
:class:`cmcl.train.strategies.base.Strategy` and the loop never branches on a method or a step.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cmcl import __version__
from cmcl.data import locks, runs
from cmcl.data.features import FeatureShard, split_files
from cmcl.data.paired import PairedFeatures, StepData, iter_batches, take_rows
from cmcl.data.protocol import Protocol, load_protocol
from cmcl.errors import RunError
from cmcl.train.config import Harness, TrainConfig
from cmcl.train.learners import FactoredTransform, ModalityLearners, PairOutput
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective, Strategy, total_loss
from cmcl.types import StepInfo

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step index, purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def build_optimizer(learners: ModalityLearners, h: Harness, *, frozen: tuple[str, ...] = (),
                    extra: list[dict[str, Any]] | tuple = ()) -> torch.optim.Optimizer:
    """A fresh optimizer over every learner but the ``frozen`` ones, plus a strategy's ``extra`` groups.

    Learners without a gradient are skipped by the optimizer. An extra group is a dict with
    ``params`` and optionally ``lr`` and ``weight_decay`` (default: the harness's).
    """
    named = [(n, p) for n, p in learners.named_parameters() if n.split(".")[1] not in frozen]
    groups = [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": h.weight_decay},
              {"params": [p for n, p in named if n.endswith("bias")],
               "weight_decay": h.weight_decay if h.decay_bias else 0.0}]
    groups += [{"lr": h.lr, "weight_decay": h.weight_decay, **g, "params": list(g["params"])} for g in extra]
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


#: the higher-order term is recorded on every HIGHER_ORDER_EVERY-th update of a step (from its first):
#: each recording costs a forward pass of the batch, ~40% of an update of a linear learner
#: (benchmarks/bench_recording.py), so every 8th keeps the cost near 5% and the step mean unbiased.
HIGHER_ORDER_EVERY = 8


def higher_order_term(objective: Objective, old: PairOutput, new: PairOutput, lr: float) -> torch.Tensor:
    """``o(η)/η`` of Theorem 6 for one update: the loss change beyond its first-order prediction.

    ``L(θ') = L(θ) + <∇L(θ), θ' - θ> + o(η)`` for the update θ → θ' (under plain SGD,
    ``θ' - θ = -η Δ`` and the first-order term is ``-η <∇L, Δ>``, the theorem's). ``L`` is the
    contrastive objective on the batch. The learners are affine in their parameters, so
    ``<∇_θ L, θ' - θ> = <∂L/∂u, u' - u> + <∂L/∂v, v' - v>`` exactly: the outputs before the update
    (the trainer's own, when the strategy evaluated the closure once) and one forward pass after it
    give the term without touching parameter gradients.
    """
    with torch.enable_grad():
        u = old.u.detach().clone().requires_grad_(True)
        v = old.v.detach().clone().requires_grad_(True)
        before = objective(u, v)
        du, dv = torch.autograd.grad(before, (u, v))
    with torch.no_grad():
        after = objective(new.u, new.v)
        first = (du * (new.u - u.detach())).sum() + (dv * (new.v - v.detach())).sum()
        return (after - before.detach() - first) / lr


#: a step's weight-gradient inputs (:meth:`Strategy.weight_grad_inputs`) are transformed (or, for a
#: :class:`FactoredTransform`, prepared) once, over all its rows, when the result takes at most this
#: many bytes; otherwise each batch transforms its own rows (the same numbers up to rounding, the
#: transform's work repeated every epoch)
WEIGHT_INPUTS_BYTES = 2 << 30


@dataclass(frozen=True)
class StepInputs:
    """One side's weight-gradient inputs of a step: what was computed over all of its rows (a
    transform's output, or a :class:`FactoredTransform`'s prepared part) and how a batch's rows of
    it are finished."""

    rows: torch.Tensor
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def batch(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The weight-gradient inputs of the batch ``rows`` of the step, whose inputs are ``x``."""
        return self.finish(x, take_rows(self.rows, rows))


def _factored(f: Callable[[torch.Tensor], torch.Tensor]) -> FactoredTransform:
    """``f`` as a :class:`FactoredTransform`; a plain transform is all ``prepare``."""
    return f if isinstance(f, FactoredTransform) else FactoredTransform(f, lambda x, fx: fx)


def weight_inputs(train: PairedFeatures, transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                  max_bytes: int | None = None) -> dict[str, StepInputs]:
    """Per side (``"a"``, ``"b"``) of a single-pair training set whose learner has a weight-gradient
    transform, that transform applied to every row (or, for a :class:`FactoredTransform`, its
    ``prepare`` part), for :meth:`ModalityLearners.forward_pairs`'s ``weight_inputs`` through
    :meth:`StepInputs.batch`: the hook's transforms are row-wise, so a batch's rows of the result
    are the transform of the batch (DNS: x U in one product per step, x − (x U) Uᵀ per batch).
    Empty for a set mixing pairs, or when the result would take more than ``max_bytes``
    (default :data:`WEIGHT_INPUTS_BYTES`)."""
    max_bytes = WEIGHT_INPUTS_BYTES if max_bytes is None else max_bytes
    pair = train.single_pair
    if pair is None or not transforms:
        return {}
    sides = [(s, _factored(transforms[m]), x)
             for s, m, x in (("a", pair[0], train.xa), ("b", pair[1], train.xb)) if m in transforms]
    with torch.no_grad():
        if sum(len(train) * f.prepare(x[:1]).shape[1] * 4 for _, f, x in sides) > max_bytes:
            return {}
        return {s: StepInputs(f.prepare(x), f.finish) for s, f, x in sides}  # one product per side


def _updates(learners: ModalityLearners, strategy: Strategy, train: PairedFeatures, opt, sched, trained, clipped,
             harness: Harness, *, epochs: int, batch_size: int, gen: torch.Generator, bar,
             objective: Objective | None = None, pre: dict[str, StepInputs] | None = None) -> list[dict]:
    """The update loop of one step; returns every update's loss terms (and, given the run's
    ``objective``, the higher-order term of Theorem 6 as ``o_eta_over_eta`` on every
    :data:`HIGHER_ORDER_EVERY`-th update, NaN on the others). ``pre``: :func:`weight_inputs` of ``train``."""
    records: list[dict[str, torch.Tensor]] = []
    update = 0
    # a strategy that evaluates the closure more than once (C-Flat's perturbed pass, say) may leave
    # outputs of other parameters on ``out``: the recording then recomputes them
    single_pass = type(strategy).compute_gradients is Strategy.compute_gradients
    for epoch in range(epochs):
        for rows in iter_batches(len(train), batch_size, gen):
            batch = train.select(rows)
            batch_pre = {s: t.batch(batch.xa if s == "a" else batch.xb, rows) for s, t in (pre or {}).items()}

            def closure():
                for p in trained:
                    p.grad = None
                out = learners.forward_pairs(batch, strategy.extra_inputs(batch), batch_pre)
                out.epoch, out.update = epoch, update
                if strategy.output_grads:  # d loss / d u and d v, on out.u.grad and out.v.grad
                    for t in (out.u, out.v):
                        if t.requires_grad:
                            t.retain_grad()
                losses = strategy.losses(batch, out)
                total = total_loss(losses)
                if total.requires_grad:  # not when every learner of the batch is frozen
                    total.backward()
                return losses, out

            losses, out = strategy.compute_gradients(closure)
            if harness.clip_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_([p for p in clipped if p.grad is not None], harness.clip_norm)
                # the factor clip_grad_norm_ applied (same formula), for hooks that need raw gradients
                out.grad_scale = min(1.0, harness.clip_norm / (float(norm) + 1e-6))
            strategy.before_update(batch, out)
            recording = objective is not None and update % HIGHER_ORDER_EVERY == 0
            if recording:  # outputs before the update (read-only; numbers unchanged)
                lr = opt.param_groups[0]["lr"]
                if single_pass:  # the closure ran once, at these parameters: its outputs are the ones
                    old = PairOutput(out.u.detach(), out.v.detach())
                else:
                    with torch.no_grad():
                        old = learners.forward_pairs(batch)
            opt.step()
            sched.step()
            strategy.after_update(batch, out)
            record = {k: v.detach() for k, v in losses.items()}
            if recording and lr > 0:
                with torch.no_grad():
                    new = learners.forward_pairs(batch)
                record["o_eta_over_eta"] = higher_order_term(objective, old, new, lr)
            records.append(record)
            update += 1
            bar.update(1)
    bar.close()
    return records


@dataclass
class StepResult:
    """What :func:`fit_step` measured."""

    losses: pd.DataFrame
    updates: int
    seconds: float
    #: seconds of the strategy's per-step work (before_step, training_set, after_step), inside ``seconds``
    strategy_seconds: float = 0.0


def fit_step(learners: ModalityLearners, strategy: Strategy, step: StepInfo, data: PairedFeatures, *,
             harness: Harness, epochs: int, batch_size: int, progress: bool = False,
             objective: Objective | None = None) -> StepResult:
    """Train one step: hooks, a fresh optimizer and scheduler, ``epochs`` passes over the batches.

    Given the run's ``objective``, every :data:`HIGHER_ORDER_EVERY`-th update also records the
    higher-order term of Theorem 6 (:func:`higher_order_term`; one extra forward pass of the batch,
    no effect on the numbers).
    """
    step = dataclasses.replace(step, clip_norm=harness.clip_norm)
    device = next(learners.parameters()).device
    synchronize(device)  # earlier queued work (a previous step's scoring) is not this step's
    start = time.perf_counter()  # the whole step, the strategy's per-step work included
    strategy.before_step(step, data)
    train = strategy.training_set(step, data)
    hook_seconds = time.perf_counter() - start
    n = len(train)
    per_epoch = -(-n // batch_size)
    total = per_epoch * epochs
    frozen = tuple(strategy.frozen(step))
    for m in frozen:  # kept out of autograd and of the optimizer for this step
        learners[m].requires_grad_(False)
    transforms = dict(strategy.weight_grad_inputs(step))
    learners.grad_inputs.update(transforms)  # installed for this step only
    try:
        t0 = time.perf_counter()
        pre = weight_inputs(train, transforms)  # the strategy's per-step work too
        hook_seconds += time.perf_counter() - t0
        opt = build_optimizer(learners, harness, frozen=frozen, extra=strategy.optimizer_groups(step))
        decay = (lambda u: max(0.0, (total - u) / total)) if harness.linear_decay else (lambda u: 1.0)
        # the schedule and the clipping apply to the learners; a strategy's extra groups keep their lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [decay, decay] + [lambda u: 1.0] * (len(opt.param_groups) - 2))
        trained = [p for g in opt.param_groups for p in g["params"]]
        clipped = [p for m in learners.modalities if m not in frozen for p in learners[m].parameters()]
        records = _updates(learners, strategy, train, opt, sched, trained, clipped, harness, epochs=epochs,
                           batch_size=batch_size, gen=torch.Generator().manual_seed(derive_seed(step.seed, 1)),
                           bar=tqdm(total=total, desc=f"step {step.index} {step.key}", unit="upd", leave=False,
                                    disable=not progress, mininterval=0.5), objective=objective, pre=pre)
    finally:
        for m in frozen:
            learners[m].requires_grad_(True)
        for m in transforms:
            learners.grad_inputs.pop(m, None)
    keys = sorted({k for r in records for k in r})
    nan = torch.tensor(float("nan"), device="cpu")
    table = {k: torch.stack([r.get(k, nan).float().cpu() for r in records]).numpy() for k in keys}
    frame = pd.DataFrame({"epoch": np.repeat(np.arange(epochs), per_epoch)[:len(records)],
                          "update": np.arange(len(records)), **table})
    t0 = time.perf_counter()
    strategy.after_step(step, data)
    synchronize(device)  # on a GPU the step's kernels may still be queued: they belong to its time
    end = time.perf_counter()
    return StepResult(frame, len(records), end - start, hook_seconds + end - t0)


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run every queued kernel (CUDA runs them asynchronously; a CPU
    has nothing queued), so that wall-clock times taken around it are the work's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: str) -> dict[str, Any]:
    """What a step's timing was measured on: the device, its name, and the torch threads used."""
    name = platform.processor() or platform.machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return {"device": device, "name": name, "threads": torch.get_num_threads(), "host": platform.node()}


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _random_weight_warning(cfg: TrainConfig, protocol: Protocol) -> None:
    for dataset in protocol.datasets:
        with FeatureShard(split_files(cfg.features, cfg.backbone, dataset, "train")[0]) as shard:
            rw = shard.meta.extra.get("random_weights", "")
            if rw:
                log.warning("%s: features were extracted with randomly initialised weights (%s); "
                            "numbers are meaningless except as a smoke test", shard.path, rw)
                return


#: ``score(learners, trained_through)``: the long-format eval rows of the learners after a step
#: (``trained_through`` 0: before training). The application wires it to :mod:`cmcl.evaluate`.
Score = Callable[[ModalityLearners, int], list[dict]]


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

    def header(self) -> dict[str, Any]:
        """The run's ``config.json``: configuration, feature fingerprint, protocol, versions."""
        p = self.protocol
        return {"config": self.cfg.to_dict(), "fingerprint": self.cfg.fingerprint(), "features": self.fingerprint,
                "protocol": {"name": p.name, "source": p.source, "sha256": p.sha256, "steps": [s.key for s in p.steps],
                             "metrics": [list(s.metrics) for s in p.steps]},
                "cmcl_version": __version__, "git_sha": _git_sha(), "torch": torch.__version__,
                "python": platform.python_version()}


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
    return RunPlan(cfg, protocol, data, runs.feature_fingerprint(cfg.features, cfg.backbone, protocol.datasets))


#: ``on_step(run, index)``: called after step ``index`` of ``run`` was written (0: the evaluation before training).
OnStep = Callable[[Path, int], None]


def train_run(plan: RunPlan, root: str | Path, *, score: Score, resume: bool = False, overwrite: bool = False,
              keep_states: str = "last", progress: bool = False, on_step: OnStep | None = None) -> Path:
    """Run the whole protocol for one strategy and seed into its run folder; returns the folder.

    Everything was validated by :func:`plan_run` before the folder is touched, and the folder is
    locked while the run writes it: a second process on the same run fails at once. Each finished
    step is written atomically with the rows ``score`` gives for it; the run ends with
    ``results.csv``.

    Args:
        plan: the validated configuration (:func:`plan_run`).
        root: root of run directories.
        score: evaluates the learners after each step (and before the first).
        resume: continue a run from its last finished step (its config must match). A run folder
            with no finished step is restarted without it.
        overwrite: delete an existing run directory first.
        keep_states: ``"last"`` keeps the strategy state of the last finished step only (enough to
            resume or append steps); ``"all"`` keeps every step's.
        progress: show progress bars.
        on_step: called with the run folder and the step index after each step folder is written
            (loggers read the step's records from there).
    """
    cfg, protocol, data = plan.cfg, plan.protocol, plan.data
    run = runs.run_dir(root, cfg.backbone, cfg.label or cfg.strategy, cfg.seed)
    with locks.exclusive(run, "run folder"):
        runs.prepare_run_folder(run, plan.header(), resume=resume, overwrite=overwrite)
        device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        _random_weight_warning(cfg, protocol)
        learners = ModalityLearners(protocol.modalities, data.dim, device=device)
        strategy = get_strategy(cfg.strategy, backbone=None, **cfg.params)
        objective = Objective(cfg.temperature, cfg.loss)
        strategy.setup(learners, objective)
        where = machine(cfg.device)
        h = cfg.resolved_harness()

        done = runs.finished_steps(run)
        last = done[-1] if done else -1
        if last > len(protocol):
            raise RunError(f"{run}: has step {last} but the protocol has {len(protocol)} steps")
        if last >= 1:
            # a protocol extended with a new modality: the stored steps have no learner for it yet
            used = {m for step in protocol.steps[:last] for m in step.modalities}
            runs.load_learners(runs.step_dir(run, last) / "learners.safetensors", learners,
                               absent_ok=set(protocol.modalities) - used)
            strategy.load_state_dict(runs.load_strategy_state(runs.step_dir(run, last) / "strategy.pt"))
            log.info("%s: resuming after step %d", run, last)
        if last < 0:
            runs.write_step(run, 0, learners=None, strategy_state=None, eval_rows=score(learners, 0))
            if on_step is not None:
                on_step(run, 0)
        for step in protocol.steps[max(last, 0):]:
            info = StepInfo(step.index, step.dataset, step.modalities, derive_seed(cfg.seed, step.index))
            train = data.train(step).to(device)
            result = fit_step(learners, strategy, info, train, harness=h, epochs=cfg.epochs,
                              batch_size=cfg.batch_size, progress=progress, objective=objective)
            t0 = time.perf_counter()
            rows = score(learners, step.index)
            losses = {k: float(np.nanmean(result.losses[k])) for k in result.losses.columns if k.endswith("_loss")}
            metrics = {"step": step.index, "dataset": step.dataset, "pair": step.pair, "n_train": len(train),
                       "updates": result.updates, "train_seconds": result.seconds,
                       "strategy_seconds": result.strategy_seconds, "machine": where,
                       "eval_seconds": time.perf_counter() - t0, "mean_losses": losses, "report": strategy.report()}
            if "o_eta_over_eta" in result.losses:
                metrics["o_eta_over_eta"] = float(np.nanmean(result.losses["o_eta_over_eta"]))
            runs.write_step(run, step.index, learners=learners, strategy_state=strategy.state_dict(),
                            eval_rows=rows, losses=result.losses, metrics=metrics)
            if keep_states == "last":
                (runs.step_dir(run, step.index - 1) / "strategy.pt").unlink(missing_ok=True)
            if on_step is not None:
                on_step(run, step.index)
            log.info("%s step %d/%d %s: %.1fs, loss %.4f", cfg.label or cfg.strategy, step.index, len(protocol),
                     step.key, result.seconds, sum(losses.values()))
            del train
        runs.write_results(run)
    return run
