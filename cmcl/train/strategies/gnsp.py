"""GNSP: gradient null-space projection with distillation and alignment preservation.

Peng, Liu, Yang, Hong & Tian, "GNSP: Gradient Null Space Projection for Preserving Cross-Modal
Alignment in VLMs Continual Learning", arXiv 2507.19839, mapped onto per-modality linear learners
(docs/strategies.md, section GNSP, puts the source beside this translation). Three parts:

* **Null-space projection.** After each step, every learner of the pair adds its inputs to a data
  matrix ``M_m``: the sum over chunks of ``gram_batch`` rows of ``X_cᵀX_c / ‖X_cᵀX_c‖_F``, scaled
  to unit Frobenius norm, and merged as ``M ← M/‖M‖_F + M_step`` (the source's rule for the CLIP
  projection ``visual.proj``, the layer a cmcl learner stands for; ``accumulate="sum"`` is its
  rule for the FFN layers, ``M ← M + M_step``). Before a step, the fewest leading eigenvectors of
  ``M_m`` holding more than ``1 - rho`` of its eigenvalue mass span the protected subspace, and
  every weight gradient is replaced by ``G - G P`` before the optimizer step (input side only).
  A modality never trained before is not projected.
* **Knowledge distillation** on a reference batch, both directions: with ``S`` the student's and
  ``S⁰`` the teacher's logits ``s·normalise(u)·normalise(v)ᵀ``,
  ``L_kd = T² [CE(S/T, softmax(S⁰/T)) + CE(Sᵀ/T, softmax(S⁰ᵀ/T))]``.
* **Modality alignment preservation (MAP)**: the CLIP loss of the reference batch under the
  student, both directions, with label smoothing: ``L_map = CE_ls(S, I) + CE_ls(Sᵀ, I)``.

The loss is ``L_base + distill · L_kd + map · L_map`` and the projection applies to its whole
gradient, as in the source. By default the biases are frozen (the source trains weight matrices
only), which makes the guarantee exact for the affine learner under plain gradient descent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import ModalityLearners, PairOutput
from cmcl.train.strategies.base import Losses, Strategy, param
from cmcl.train.strategies.projection import Projector, projector_from_covariance
from cmcl.types import StepInfo

ACCUMULATE = ("proj", "sum")
TEACHERS = ("initial", "previous")


def data_matrix(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``Σ_c X_cᵀX_c / ‖X_cᵀX_c‖_F`` over consecutive chunks of ``chunk`` rows, in float64.

    ``‖X_cᵀX_c‖_F = ‖X_c X_cᵀ‖_F``, so each chunk's norm comes from a chunk × chunk Gram matrix and
    the sum is one weighted d × d product ``Xᵀ diag(w) X``.
    """
    x = x.to(torch.float64)
    n = x.shape[0]
    weights = torch.empty(n, dtype=torch.float64, device=x.device)
    for lo in range(0, n, chunk):
        block = x[lo:lo + chunk]
        norm = torch.linalg.matrix_norm(block @ block.T)
        weights[lo:lo + chunk] = 1.0 / norm if norm > 0 else 0.0
    return x.T @ (x * weights[:, None])


def _unit(m: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(m)
    return m / norm if norm > 0 else m


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · CE(student/T, softmax(teacher/T))``, the mean over rows (the source's ``distillation``)."""
    target = torch.softmax(teacher / temperature, dim=1)
    return F.cross_entropy(student / temperature, target) * temperature ** 2


class GNSP(Strategy):
    """Input-side null-space projection of the weight gradients, plus KD and MAP on a reference batch."""

    @dataclass(frozen=True)
    class Params(Strategy.Params):              # the source's configs/mtil_order_I.json and src/args.py
        # the largest share of the data matrix's eigenvalue mass left unprotected (gnsp_rho)
        rho: float = param(0.15, ge=0, lt=1)
        distill: float = param(1.0, ge=0)       # weight of L_kd
        map: float = param(0.75, ge=0)          # weight of L_map
        kd_temperature: float = param(2.0, gt=0)    # T of the distillation
        label_smoothing: float = param(0.2, ge=0, lt=1)     # of the MAP cross-entropies
        # s, the scale of the reference logits; None: 1/τ of the run's InfoNCE, the scale the base loss
        # trains with (the source uses its backbone's CLIP scale, 100, for its task loss and these terms)
        logit_scale: float | None = param(None, gt=0)
        ref_batch: int = param(64, ge=2)        # pairs per reference batch (the source's batch size)
        # "initial": the frozen encoders, i.e. identity learners (the source's ref_model="initial");
        # "previous": the learners at the start of the step
        teacher: str = param("initial", choices=TEACHERS)
        gram_batch: int = param(16, ge=1)       # rows per chunk of the data matrix (the source's 16)
        accumulate: str = param("proj", choices=ACCUMULATE)     # see the module docstring
        train_bias: bool = False                # the source freezes the biases

    name = "gnsp"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.matrices: dict[str, torch.Tensor] = {}     # modality -> data matrix M_m (float64)
        self._proj: dict[str, Projector] = {}
        self._ref: PairedFeatures | None = None
        self._gen: torch.Generator | None = None
        self._teacher: ModalityLearners | None = None
        self._sums: dict[str, float] = {}
        self._report: dict[str, float] = {}

    @property
    def scale(self) -> float:
        """s, the logit scale of the reference terms."""
        return 1.0 / self.objective.temperature if self.logit_scale is None else self.logit_scale

    @property
    def uses_reference(self) -> bool:
        return self.distill > 0 or self.map > 0

    # ------------------------------------------------------------------ per step
    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        device = self.learners[step.modalities[0]].weight.device
        self._proj, self._sums, self._report = {}, {"kd": 0.0, "map": 0.0, "updates": 0}, {}
        for m in dict.fromkeys(step.modalities):
            if m in self.matrices:
                p = projector_from_covariance(self.matrices[m], energy=1.0 - self.rho) if self.rho > 0 \
                    else Projector.identity(self.learners.dim)
            else:
                p = Projector.zero(self.learners.dim)
            self._proj[m] = p.to(device)
            self._report[f"gnsp/rank/{m}"] = float(p.rank)
        self._ref = data
        self._gen = torch.Generator().manual_seed(step.seed)
        self._teacher = None
        if self.uses_reference and self.teacher == "previous":
            self._teacher = copy.deepcopy(self.learners).requires_grad_(False)

    def reference_losses(self, ref: PairedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_kd, L_map)`` of a reference batch (unweighted)."""
        out = self.learners.forward_pairs(ref)
        s = self.scale
        student = s * F.normalize(out.u, dim=1) @ F.normalize(out.v, dim=1).T
        with torch.no_grad():
            if self._teacher is None:      # the initial learners are the identity: outputs = inputs
                tu, tv = ref.xa, ref.xb
            else:
                t = self._teacher.forward_pairs(ref)
                tu, tv = t.u, t.v
            teacher = s * F.normalize(tu, dim=1) @ F.normalize(tv, dim=1).T
        T = self.kd_temperature
        kd = distillation(student, teacher, T) + distillation(student.T, teacher.T, T)
        target = torch.arange(len(ref), device=student.device)
        ls = self.label_smoothing
        align = F.cross_entropy(student, target, label_smoothing=ls) + \
            F.cross_entropy(student.T, target, label_smoothing=ls)
        return kd, align

    def _draw(self) -> PairedFeatures:
        """A reference batch: an independent uniform draw from the step's own pairs."""
        n = len(self._ref)
        pick = torch.randperm(n, generator=self._gen)[:min(self.ref_batch, n)]
        return self._ref.select(pick)

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        losses = super().losses(batch, out)
        if not self.uses_reference or self._ref is None or len(self._ref) < 2:
            return losses
        kd, align = self.reference_losses(self._draw())
        self._sums["kd"] += float(kd.detach())
        self._sums["map"] += float(align.detach())
        self._sums["updates"] += 1
        if self.distill > 0:
            losses["kd_loss"] = self.distill * kd
        if self.map > 0:
            losses["map_loss"] = self.map * align
        return losses

    def before_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        with torch.no_grad():
            for m, p in self._proj.items():
                layer = self.learners[m]
                if not self.train_bias:
                    layer.bias.grad = None       # frozen: AdamW skips it (no decay, no moments)
                g = layer.weight.grad
                if g is None or p.is_zero:
                    continue
                g.sub_(p.right(g))               # G ← G − G P: G now lies in the null space

    # ------------------------------------------------------------------ data matrices
    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._ref, self._teacher = None, None
        with torch.no_grad():
            for m, x in ((step.modalities[0], data.xa), (step.modalities[1], data.xb)):
                new = _unit(data_matrix(x, self.gram_batch))
                old = self.matrices.get(m)
                if old is None:
                    self.matrices[m] = new
                elif self.accumulate == "proj":
                    self.matrices[m] = _unit(old) + new
                else:
                    self.matrices[m] = old + new
        updates = self._sums.get("updates", 0)
        if updates:
            self._report["gnsp/kd_loss"] = self._sums["kd"] / updates
            self._report["gnsp/map_loss"] = self._sums["map"] / updates

    def report(self) -> dict[str, float]:
        """Protected rank per learner of the step, and the mean raw KD and MAP losses."""
        return dict(self._report)

    def state_dict(self) -> dict[str, Any]:
        return {"matrices": {m: c.cpu() for m, c in self.matrices.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(self.learners.parameters()).device
        self.matrices = {m: c.to(device) for m, c in state["matrices"].items()}
