"""Co2L: contrastive continual learning with asymmetric replay and relation distillation.

Cha et al., ICCV 2021, mapped onto paired embeddings and per-modality linear learners as in
baselines.md §7:

* **Replay.** A step-balanced buffer (policy S, M = ``buffer_size``) refilled at the end of each
  step; during step t the training set is ``D_t ∪ buffer`` (replay rows merged into the data, as
  Co2L does, not drawn as a separate batch). Buffered rows keep their own modality pair, and the
  mixed batches are projected with each row's own learners.
* **Asymmetric contrastive loss.** Only current rows are anchors; buffered rows act as extra
  negatives, but only through outputs that live in the anchor's target space (``replay``, the
  erratum to baselines.md §7 item 3): an anchor u_i of modality a in a step (a, b) is scored
  against every output of modality b in the batch (the b side of current rows and of buffered
  pairs whose b side is b, and the a side of buffered pairs whose a side is b), never against an
  output of another modality. ``L_asym = (1/|C|) Σ_{i∈C} -log softmax_{j∈S_b}(u_i·z_j/τ)[i]``.
  It is the run's InfoNCE exactly when the batch holds no buffered row (step 1).
  ``replay="own_pair"`` also lets each buffered pair anchor its own pair (its a output against
  the outputs of its b modality); ``replay="all_rows"`` is the earlier mapping, which made every
  buffered row's b output a negative whatever its modality (kept for the ablation only).
* **Instance-wise relation distillation (IRD).** Over the 2n L2-normalised embeddings
  ``Z = normalise([U; V])``, the student's row-softmax over the other 2n-1 similarities at
  temperature κ is pulled towards a frozen teacher's (the learners at the start of the step) at
  κ*: ``L_IRD = (1/2n) Σ_r Σ_{s≠r} -p*_rs log p_rs``. Active from step 2 on.

The loss terms are ``asym_loss`` and ``ird_loss`` (already multiplied by the distillation weight);
the trainer sums them. C-Flat (:mod:`.cflat`) and CILA (:mod:`.cila`) reuse this class.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import ModalityLearners, PairOutput
from cmcl.train.objective import two_way
from cmcl.train.strategies.base import Closure, Losses, Objective, param
from cmcl.train.strategies.buffer import Replay, own_rows
from cmcl.types import StepInfo


def asymmetric_contrastive(u: torch.Tensor, v: torch.Tensor, current: torch.Tensor, *,
                           temperature: float = 1.0, direction: str = "a2b") -> torch.Tensor:
    """InfoNCE whose anchors are the ``current`` rows only; every column is a candidate.

    Args:
        u, v: (n, d) outputs of the a and b learners, row-aligned.
        current: (n,) bool, rows of the current step (buffered rows are negatives only).
        temperature: τ.
        direction: ``"a2b"`` (rows of ``u`` are anchors) or ``"symmetric"`` (mean of a→b and b→a,
            both anchored on the current rows).

    Returns:
        The mean over current anchors; 0 (with a zero gradient) when there is none.
    """
    logits = u @ v.T
    if temperature != 1.0:
        logits = logits / temperature
    count = current.sum().clamp_min(1)

    def one_way(dim: int) -> torch.Tensor:
        # torch.where, not a product: a masked row never leaks into the value, even if non-finite.
        return -torch.where(current, torch.log_softmax(logits, dim=dim).diagonal(), 0.0).sum() / count

    return two_way(direction, lambda: one_way(1), lambda: one_way(0))


REPLAY_MODES = ("same_space", "own_pair", "all_rows")


def _codes(*names: np.ndarray) -> list[np.ndarray]:
    """Integer codes of modality-name arrays, consistent across the arrays."""
    joined = np.concatenate([np.asarray(n).astype(str) for n in names])
    _, inverse = np.unique(joined, return_inverse=True)
    out, lo = [], 0
    for n in names:
        out.append(inverse[lo:lo + len(n)])
        lo += len(n)
    return out


def space_contrastive_rows(u: torch.Tensor, v: torch.Tensor, ma: np.ndarray, mb: np.ndarray,
                           anchors: torch.Tensor, *, temperature: float = 1.0,
                           direction: str = "a2b") -> torch.Tensor:
    """Per-row InfoNCE whose negatives are the batch's outputs in the anchor's target space only.

    Row r's anchor ``u_r`` (modality ``ma[r]``) is scored against every output of modality ``mb[r]``
    in the batch: the ``v_j`` with ``mb[j] == mb[r]`` and the ``u_j`` with ``ma[j] == mb[r]``; its
    positive is ``v_r``. An output of any other modality is never a candidate, so a step (a, b)
    never pushes a away from the c outputs of a stored (a, c) pair. With ``direction="symmetric"``
    the b→a term anchors ``v_r`` against the outputs of modality ``ma[r]`` and the two are averaged.

    Args:
        u, v: (n, d) outputs of the rows' a and b learners.
        ma, mb: (n,) modality names.
        anchors: (n,) bool, rows whose loss is formed.
        temperature: τ.
        direction: ``"a2b"`` or ``"symmetric"``.

    Returns:
        (n,) per-row losses, 0 where ``anchors`` is False.
    """
    n = u.shape[0]
    ca, cb = (torch.as_tensor(c, device=u.device) for c in _codes(ma, mb))
    eye = torch.eye(n, dtype=torch.bool, device=u.device)

    def one_way(anchor, partner, m_anchor, m_partner):
        # candidates: [partner outputs | anchor-side outputs]; target space = the partner's modality
        cand_mod = torch.cat([m_partner, m_anchor])
        valid = cand_mod[None, :] == m_partner[:, None]
        valid[:, n:] &= ~eye                            # an anchor is never its own negative
        logits = anchor @ torch.cat([partner, anchor]).T
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=1)
        return -torch.where(anchors, logp.diagonal(), 0.0)

    return two_way(direction, lambda: one_way(u, v, ca, cb), lambda: one_way(v, u, cb, ca))


def relation_targets(z_teacher: torch.Tensor, kappa_past: float) -> torch.Tensor:
    """The teacher's relation distribution p*: row softmax of ``Z* Z*ᵀ/κ*`` without the diagonal."""
    eye = torch.eye(z_teacher.shape[0], dtype=torch.bool, device=z_teacher.device)
    return torch.softmax((z_teacher @ z_teacher.T / kappa_past).masked_fill(eye, float("-inf")), dim=1)


class _RelationDistillation(torch.autograd.Function):
    """IRD of the stacked outputs ``X = [U; V]`` with its gradient in closed form.

    ``Z = X/‖X‖`` row-wise (as ``F.normalize``), ``l_rs = z_r·z_s/κ`` (s ≠ r) and
    ``L = -(1/N) Σ_r Σ_{s≠r} p*_rs log p_rs``. Then ``∂L/∂l_rs = (p_rs Σ_s' p*_rs' - p*_rs)/N`` (zero
    on the diagonal), ``∂L/∂Z = (G + Gᵀ) Z/κ`` (one product, where autograd of ``Z Zᵀ`` takes two)
    and ``∂L/∂x_r = (∂L/∂z_r - z_r (z_r·∂L/∂z_r))/‖x_r‖``; no graph of the normalisation or of
    the masked log-softmax is built.
    """

    @staticmethod
    def forward(ctx, x, targets, kappa):  # noqa: D102
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
        z = x / norm
        eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logp = torch.log_softmax((z @ z.T / kappa).masked_fill(eye, float("-inf")), dim=1).masked_fill(eye, 0.0)
        ctx.save_for_backward(z, norm, targets, logp)
        ctx.kappa = kappa
        return -(targets * logp).sum(dim=1).mean()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        z, norm, targets, logp = ctx.saved_tensors
        p = logp.exp()
        p.diagonal().zero_()                    # p_rr = 0 (its log was stored as 0)
        g = p.mul_(targets.sum(dim=1, keepdim=True)).sub_(targets)
        dz = (g + g.T).mm(z).mul_(grad_out / (z.shape[0] * ctx.kappa))
        return dz.sub_(z * (z * dz).sum(dim=1, keepdim=True)).div_(norm), None, None


def relation_distillation(x: torch.Tensor, targets: torch.Tensor, kappa: float) -> torch.Tensor:
    """IRD: the mean over rows of the cross-entropy from ``targets`` (p*) to the student's p.

    ``x`` are the student's 2n stacked outputs ``[U; V]``, L2-normalised here row-wise (unit rows
    stay unit up to rounding); the diagonal s = r is masked to -inf before the softmax
    (``log_softmax`` subtracts the row max of the remaining entries), so p_rr is never formed,
    and its log is zeroed so that ``0·log 0`` does not produce a NaN. Only the gradient with
    respect to ``x`` is formed (the targets are the frozen teacher's).
    """
    return _RelationDistillation.apply(x, targets.detach(), kappa)


def stacked_unit(out: PairOutput) -> torch.Tensor:
    """``normalise([U; V])`` row-wise: the 2n embeddings IRD relates."""
    return F.normalize(torch.cat([out.u, out.v]), dim=1)


_BLOCK = 8192


@dataclass
class IndexedRows(PairedFeatures):
    """A training set whose batches remember their rows' positions in it.

    The trainer batches with :meth:`select`, so a batch of these carries ``row`` and the teacher's
    outputs, computed once per step for the whole training set, are looked up instead of being
    recomputed at every update (the teacher is frozen within a step).
    """

    row: torch.Tensor

    @classmethod
    def wrap(cls, data: PairedFeatures) -> IndexedRows:
        """``data`` with rows numbered 0..N-1."""
        fields = {k: getattr(data, k) for k in ("xa", "xb", "ma", "mb", "step", "labels", "ids")}
        return cls(**fields, row=torch.arange(len(data), device=data.xa.device))

    def select(self, rows: torch.Tensor | Any | slice) -> IndexedRows:
        base = super().select(rows)
        index = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.int64).to(self.row.device)
        return IndexedRows(**{k: getattr(base, k) for k in ("xa", "xb", "ma", "mb", "step", "labels", "ids")},
                           row=self.row[index])

    def to(self, device: torch.device | str) -> IndexedRows:
        return replace(super().to(device), row=self.row.to(device))


@dataclass(frozen=True)
class Co2LParams(Replay.Params):
    """Co2L's hyperparameters but the IRD weight (baselines.md §1 table and §7); CILA shares them."""

    kappa: float = param(0.2, gt=0)             # the student's IRD temperature κ (Co2L's; not in the appendix)
    kappa_past: float = param(0.01, gt=0)       # the teacher's IRD temperature κ*
    # τ of L_asym; None: the run's InfoNCE temperature (1, the paper's), so step 1 equals Vanilla
    temperature: float | None = param(None, gt=0)
    replay: str = param("same_space", choices=REPLAY_MODES)     # how buffered rows enter L_asym (module docstring)


class Co2L(Replay):
    """Asymmetric replay contrastive loss plus instance-wise relation distillation."""

    @dataclass(frozen=True)
    class Params(Co2LParams):
        distill_power: float = param(1.0, ge=0)  # weight of L_IRD (the appendix's "distillation power")

    name = "co2l"
    step_key = "{name}/buffer/step{s:02d}"       # Co2L's family logs its buffer under its name, without totals
    report_totals = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.teacher: ModalityLearners | None = None
        self._step_index = 0
        self._replay_rows = 0
        self._raw: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._sums: torch.Tensor | None = None     # running (asym, ird) sums over the step's updates
        self._updates = 0
        # C-Flat evaluates the same batch several times: the teacher's targets are then cached.
        self._cache_targets = False
        self._targets: torch.Tensor | None = None
        self._teacher_rows: torch.Tensor | None = None   # (N, 2, d) normalised teacher outputs
        self._report: dict[str, float] = {}

    # ------------------------------------------------------------------ hooks
    def setup(self, learners: ModalityLearners, objective: Objective) -> None:
        super().setup(learners, objective)
        self.tau = objective.temperature if self.temperature is None else self.temperature
        self._base = Objective(self.tau, objective.direction)

    @property
    def distilling(self) -> bool:
        """Whether the IRD term is on (every step after the first)."""
        return self._step_index > 1

    def distill_weight(self) -> float:
        """The weight of ``L_IRD`` during the current step."""
        return self.distill_power

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().before_step(step, data)
        self._step_index = step.index
        self._sums, self._updates, self._raw = None, 0, None
        self.teacher, self._teacher_rows = None, None
        if self.distilling:
            # A frozen copy of every learner: buffered rows are projected with their own ones.
            self.teacher = copy.deepcopy(self.learners).requires_grad_(False)

    def training_set(self, step: StepInfo, data: PairedFeatures) -> PairedFeatures:
        data = own_rows(step, data)     # the current step's tag marks the anchors
        stored = self.buffer.features()
        self._replay_rows = 0 if stored is None else len(stored)
        train = data if stored is None else PairedFeatures.concat([data, stored.to(data.xa.device)])
        if not self.distilling:
            return train
        # The teacher's normalised outputs of every training row, once: O(N d²) per step rather
        # than per epoch, and no mixed-batch teacher forward at each update.
        with torch.no_grad():
            blocks = []
            for lo in range(0, len(train), _BLOCK):
                out = self.teacher.forward_pairs(train.select(slice(lo, lo + _BLOCK)))
                blocks.append(torch.stack([F.normalize(out.u, dim=1), F.normalize(out.v, dim=1)], dim=1))
            self._teacher_rows = torch.cat(blocks)
        return IndexedRows.wrap(train)

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        if self._replay_rows == 0:
            # No buffered row can be in the batch: exactly the run's InfoNCE (Vanilla at step 1).
            asym = self._base(out.u, out.v)
        elif self.replay == "all_rows":
            asym = asymmetric_contrastive(out.u, out.v, batch.step == self._step_index,
                                          temperature=self.tau, direction=self.objective.direction)
        else:
            anchors = batch.step == self._step_index
            if self.replay == "own_pair":
                anchors = torch.ones_like(anchors)
            rows = space_contrastive_rows(out.u, out.v, batch.ma, batch.mb, anchors,
                                          temperature=self.tau, direction=self.objective.direction)
            asym = rows.sum() / anchors.sum().clamp_min(1)
        if not self.distilling:
            self._raw = (asym.detach(), None)
            return {"asym_loss": asym}
        ird = relation_distillation(torch.cat([out.u, out.v]), self._teacher_targets(batch), self.kappa)
        self._raw = (asym.detach(), ird.detach())
        return {"asym_loss": asym, "ird_loss": self.distill_weight() * ird}

    @contextlib.contextmanager
    def same_batch(self):
        """Within the block every evaluation is of one batch (C-Flat's perturbed points): the
        teacher's relation targets are computed once and reused."""
        self._cache_targets, self._targets = True, None
        try:
            yield
        finally:
            self._cache_targets, self._targets = False, None

    def _teacher_targets(self, batch: PairedFeatures) -> torch.Tensor:
        if self._cache_targets and self._targets is not None:
            return self._targets
        with torch.no_grad():
            row = getattr(batch, "row", None)
            if row is not None and self._teacher_rows is not None:
                z = self._teacher_rows[row]
                z_teacher = torch.cat([z[:, 0], z[:, 1]])
            else:   # a batch not drawn from training_set's rows: run the frozen teacher
                z_teacher = stacked_unit(self.teacher.forward_pairs(batch))
            targets = relation_targets(z_teacher, self.kappa_past)
        if self._cache_targets:
            self._targets = targets
        return targets

    def compute_gradients(self, closure: Closure) -> tuple[Losses, PairOutput]:
        result = closure()
        self._record()
        return result

    def _record(self) -> None:
        """Add the last evaluation's raw terms to the step's running sums (no host sync)."""
        if self._raw is None:      # a closure that did not go through :meth:`losses`
            return
        (asym, ird), self._raw = self._raw, None
        pair = torch.stack([asym, ird if ird is not None else torch.zeros_like(asym)]).float()
        self._sums = pair if self._sums is None else self._sums + pair
        self._updates += 1

    def step_means(self) -> tuple[float, float] | None:
        """Mean raw ``(L_asym, L_IRD)`` over the current step's updates so far (``None`` if none)."""
        if not self._updates:
            return None
        asym, ird = (self._sums / self._updates).tolist()
        return asym, ird

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().after_step(step, data)
        self.teacher, self._teacher_rows, self._targets = None, None, None
        report: dict[str, float] = {f"{self.name}/replay_rows": float(self._replay_rows)}
        means = self.step_means()
        if means is not None:
            report[f"{self.name}/asym_loss"] = means[0]
            if self.distilling:
                report[f"{self.name}/ird_loss"] = means[1]
                report[f"{self.name}/distill_weight"] = float(self.distill_weight())
        self._report = report

    def report(self) -> dict[str, float]:
        """Replayed rows, the mean raw loss terms, the IRD weight and the buffer per step (after the fill)."""
        return self._report | super().report()
