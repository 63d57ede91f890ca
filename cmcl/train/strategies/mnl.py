"""MNL: multimodal negative learning (Gong et al., NeurIPS 2025), translated to paired embeddings.

MNL is a supervised late-fusion classifier for modality imbalance: per sample, the *robust dominant*
modality (higher target confidence **and** larger unimodal confidence margin, UCoM) guides the weak
one to shape its non-target classes. CMCL trains without labels, so [ours]:

* **classes are in-batch pair indices**: modality a classifies ``u_i`` over ``{v_j}`` (row ``i`` of
  ``S = u vᵀ/τ``), modality b classifies ``v_i`` over ``{u_j}`` (column ``i``); target ``i``. The
  late fusion is ``F = ½(S + Sᵀ)``.
* the shared competitor ``j*_i = argmax_{j≠i} F_ij`` (the code's fused strongest non-target);
  UCoM ``ξ^a_i = S_ii - S_{i j*}``, ``ξ^b_i = S_ii - S_{j* i}``; target confidences
  ``π^a_i = softmax(S_i·)_i``, ``π^b_i = softmax(S_·i)_i``.
* a guides b where ``ξ^a > ξ^b`` and ``π^a > π^b``; b guides a where ``ξ^a ≤ ξ^b`` and ``π^a ≤ π^b``;
  mixed samples get no guidance (masks under ``no_grad``, as in the code).
* the weak direction predicts over **detached prototypes** (``Q^b_i· = softmax_j(v_i·sg(u_j)/τ)``,
  ``Q^a_i· = softmax_j(u_i·sg(v_j)/τ)``) and the dominant distribution ``P^D`` is detached, so the
  guidance gradient reaches only the weak modality's learner, as MNL updates only the weak branch.
* per guided sample ``ℓ_i = μ·(-log Q^W_ii) - λ·Σ_{j≠i} P^D_ij log Q^W_ij`` (the code's extra CE on
  the weak modality plus the negative-learning term); ``reduction="per_sample"`` averages ``ℓ`` over
  the B samples (unguided ones count 0), ``"code"`` divides by B·B as the code's mean over B×C.

The base loss is the toolkit's InfoNCE (``base="toolkit"``) or the code's three cross-entropies
``CE(S) + CE(Sᵀ) + CE(F)`` (``base="paper"``). MNL is on from ``warmup_epochs`` (0, as the code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Losses, Strategy, param
from cmcl.types import StepInfo

BASES = ("toolkit", "paper")
REDUCTIONS = ("per_sample", "code")


def guidance_masks(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Which samples a guides (``a2b``) and which b guides (``b2a``), from logits ``S`` (B×B).

    Returns the two boolean masks and the intermediate quantities (``j``, ``xi_a``, ``xi_b``,
    ``pi_a``, ``pi_b``) for inspection.
    """
    with torch.no_grad():
        n = s.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=s.device)
        fused = 0.5 * (s + s.T)
        j = fused.masked_fill(eye, float("-inf")).argmax(dim=1)
        idx = torch.arange(n, device=s.device)
        target = s.diagonal()
        xi_a = target - s[idx, j]
        xi_b = target - s[j, idx]
        pi_a = torch.softmax(s, dim=1).diagonal()
        pi_b = torch.softmax(s, dim=0).diagonal()
        a2b = (xi_a > xi_b) & (pi_a > pi_b)
        b2a = (xi_a <= xi_b) & (pi_a <= pi_b)
    return a2b, b2a, {"j": j, "xi_a": xi_a, "xi_b": xi_b, "pi_a": pi_a, "pi_b": pi_b}


def guided_loss(weak_logits: torch.Tensor, dominant_prob: torch.Tensor, *, ce_weight: float,
                weight: float) -> torch.Tensor:
    """Per-sample ``μ·(-log q_ii) - λ·Σ_{j≠i} p_ij log q_ij`` with ``q = softmax(weak_logits)``.

    ``dominant_prob`` (B×B) is used as given (the caller detaches it).
    """
    logq = torch.log_softmax(weak_logits, dim=1)
    eye = torch.eye(len(logq), dtype=torch.bool, device=logq.device)
    negative = -(dominant_prob.masked_fill(eye, 0.0) * logq).sum(dim=1)
    return ce_weight * -logq.diagonal() + weight * negative


class MNL(Strategy):
    """Dominant retrieval direction guides the weak one on non-target (in-batch) candidates.

    Hyperparameters:
        weight: λ, the negative-learning weight (0.7/3 per sample = the released run's 0.7 over 3 classes).
        ce_weight: μ, the weak direction's extra cross-entropy (1/3 per sample = the code's 1 over 3).
        reduction: ``per_sample`` (sum over candidates, mean over samples) or ``code`` (mean over B×B;
            use ``weight=0.7, ce_weight=1`` for the code's literal numbers).
        warmup_epochs: epochs of base loss only at the start of each step.
        base: ``toolkit`` (the run's InfoNCE) or ``paper`` (CE rows + CE columns + CE fused).
    """

    @dataclass(frozen=True)
    class Params(Strategy.Params):
        weight: float = param(0.7 / 3, ge=0)
        ce_weight: float = param(1 / 3, ge=0)
        reduction: str = param("per_sample", choices=REDUCTIONS)
        warmup_epochs: int = param(0, ge=0)
        base: str = param("toolkit", choices=BASES)

    name = "mnl"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._sums = {"a2b": 0.0, "b2a": 0.0, "rows": 0.0}

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._sums = {"a2b": 0.0, "b2a": 0.0, "rows": 0.0}

    def base_loss(self, s: torch.Tensor | None, out: PairOutput) -> torch.Tensor:
        """The loss MNL is added to (``s = u vᵀ/τ``, needed by ``base="paper"`` only)."""
        if self.base == "toolkit":
            return self.objective(out.u, out.v)
        target = torch.arange(len(s), device=s.device)
        return F.cross_entropy(s, target) + F.cross_entropy(s.T, target) + F.cross_entropy(0.5 * (s + s.T), target)

    def guidance(self, out: PairOutput, s: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MNL term and the two guidance masks for outputs ``out`` (``s = u vᵀ/τ`` if known)."""
        tau = self.objective.temperature
        u, v = out.u, out.v
        if s is None:
            s = u @ v.T / tau
        a2b, b2a, _ = guidance_masks(s.detach())
        p_a = torch.softmax(s.detach(), dim=1)        # a's distribution over the v's (rows)
        p_b = torch.softmax(s.detach().T, dim=1)      # b's distribution over the u's (columns)
        q_b = v @ u.detach().T / tau                  # weak b, prototypes sg(u)
        q_a = u @ v.detach().T / tau                  # weak a, prototypes sg(v)
        zero = torch.zeros((), device=u.device, dtype=u.dtype)
        ell_b = guided_loss(q_b, p_a, ce_weight=self.ce_weight, weight=self.weight)
        ell_a = guided_loss(q_a, p_b, ce_weight=self.ce_weight, weight=self.weight)
        total = torch.where(a2b, ell_b, zero).sum() + torch.where(b2a, ell_a, zero).sum()
        n = len(u)
        return total / (n if self.reduction == "per_sample" else n * n), a2b, b2a

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        s = out.u @ out.v.T / self.objective.temperature if self.base == "paper" else None
        losses = {"contrastive_loss": self.base_loss(s, out)}
        if out.epoch < self.warmup_epochs or (self.weight == 0 and self.ce_weight == 0):
            return losses
        term, a2b, b2a = self.guidance(out, s)
        self._sums["a2b"] += float(a2b.sum())
        self._sums["b2a"] += float(b2a.sum())
        self._sums["rows"] += len(batch)
        losses["mnl_loss"] = term
        return losses

    def report(self) -> dict[str, float]:
        rows = self._sums["rows"]
        if not rows:
            return {}
        return {"mnl/guided_a2b": self._sums["a2b"] / rows, "mnl/guided_b2a": self._sums["b2a"] / rows}
