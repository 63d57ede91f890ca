"""PNR: pseudo-negative regularisation (Cha, Cho & Moon, ICML 2024), SimCLR-PNR translated to CMCL.

At step t >= 2 a frozen copy of the pair's learners is taken (the "previous model", state at the end
of step t-1) and, with current outputs ``u = f_a(x_a)``, ``v = f_b(x_b)`` and old ones ``ū, v̄``:

* **main term** (plasticity): the toolkit's InfoNCE whose row ``i`` also has the previous learner's
  outputs of the current batch as pseudo-negatives, logits ``[u vᵀ | u v̄ᵀ] / τ`` with target ``i``
  in the first block. ``old_partner_negative=True`` keeps ``v̄_i`` a negative (the official code
  keeps the old model's positive view); ``False`` masks it.
* **regulariser** (stability), per modality m with current ``z``, old ``z̄`` and predictor ``h``:
  ``ℓ_i = -cos(h(z_i), z̄_i)/τ_r + log Σ_{j≠i} [exp(cos(h(z_i), z̄_j)/τ_r) + exp(cos(h(z_i), z_j)/τ_r)]``
  (decoupled: the positive is not in the denominator); the loss adds ``reg_weight`` times the mean
  over both modalities' anchors. ``reg_pool_modalities=True`` pools both modalities' vectors into
  one 2B set (the code's pooling of the two views).

Step 1 is plain InfoNCE (PNR's task 0) unless ``regularise_first_step``. With ``loss=symmetric`` the
main term is built per direction and averaged. The choices marked [ours] in
``docs/strategies.md`` (no predictor by default, cosine regulariser, in-modality negatives, ...) are
the translation from two augmented views of an image to the two modalities of a pair.

The optional predictor (``linear``: identity-initialised ``Linear(d, d)``; ``mlp``: the code's
``Linear(d, hidden) → BatchNorm → ReLU → Linear(hidden, d)``) is one module per modality, created at
its first use and carried across steps. PNR hands them to the trainer's optimizer as an extra
parameter group (``predictor_lr``, ``predictor_weight_decay``; not clipped, not scheduled), rebuilt at
every step like the rest of the optimizer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.objective import two_way
from cmcl.train.strategies.base import Losses, Strategy, param
from cmcl.types import StepInfo

PREDICTORS = ("none", "linear", "mlp")
REG_SIMILARITIES = ("cos", "dot")


def _predictor(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        layer = nn.Linear(dim, dim)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(dim))
            layer.bias.zero_()
        return layer
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))


def main_term(u: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor, *, temperature: float = 1.0,
              old_partner_negative: bool = True) -> torch.Tensor:
    """One direction of PNR's main term: InfoNCE of ``u`` over ``[v | v_old]``, target ``i`` in ``v``.

    Args:
        u: (B, d) anchors (with gradient).
        v: (B, d) current candidates (with gradient).
        v_old: (B, d) the previous learner's outputs of the same rows (pseudo-negatives).
        temperature: the toolkit's τ.
        old_partner_negative: keep ``v_old[i]`` as a negative of row ``i`` (the official code does).
    """
    pseudo = u @ v_old.T
    if not old_partner_negative:
        pseudo = pseudo.masked_fill(torch.eye(len(u), dtype=torch.bool, device=u.device), float("-inf"))
    logits = torch.cat([u @ v.T, pseudo], dim=1)
    if temperature != 1.0:
        logits = logits / temperature
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))


def regulariser(p: torch.Tensor, z: torch.Tensor, z_old: torch.Tensor, groups: torch.Tensor, *,
                temperature: float = 0.2, similarity: str = "cos") -> torch.Tensor:
    """Per-anchor PNR regulariser ``ℓ_i`` (a vector), anchors ``p = h(z)``, positive ``z_old[i]``.

    Negatives of anchor ``i`` are ``z_old[j]`` and ``z[j]`` for every ``j ≠ i`` with
    ``groups[j] == groups[i]`` (one group per modality; a single group pools them). With cosine the
    positive is left out of the denominator, as in the code; with raw dot products that form is
    unbounded below, so ``similarity="dot"`` is the standard InfoNCE (positive in the denominator).
    """
    if similarity == "cos":
        p, z, z_old = F.normalize(p, dim=1), F.normalize(z, dim=1), F.normalize(z_old, dim=1)
    to_old = p @ z_old.T / temperature
    to_cur = p @ z.T / temperature
    n = len(p)
    eye = torch.eye(n, dtype=torch.bool, device=p.device)
    other_group = groups[:, None] != groups[None, :]
    positive = to_old.diagonal()
    # decoupled (cos): the positive leaves the denominator; standard (dot): it stays
    neg_old = to_old.masked_fill(other_group | eye if similarity == "cos" else other_group, float("-inf"))
    neg_cur = to_cur.masked_fill(other_group | eye, float("-inf"))
    return -positive + torch.logsumexp(torch.cat([neg_old, neg_cur], dim=1), dim=1)


class PNR(Strategy):
    """Pseudo-negatives from the previous learners in the main term and a symmetric regulariser.

    Hyperparameters:
        reg_weight: λ_r, weight of the regulariser (the code's implicit 1).
        reg_temperature: τ_r of the regulariser (the code's ``distill_temperature``, 0.2).
        predictor: ``none`` (identity, default [ours]), ``linear`` (identity-initialised) or ``mlp``.
        predictor_hidden: hidden width of the ``mlp`` predictor (2048 in the code).
        predictor_lr, predictor_weight_decay: the predictors' parameter group in the trainer's AdamW.
        old_partner_negative: the old partner ``v̄_i`` is a negative of ``u_i`` (code: yes).
        reg_pool_modalities: pool both modalities in the regulariser's negatives (code's pooling).
        regularise_first_step: PNR at step 1 too, against the identity learners.
        pseudo_negatives: add the previous learners' outputs to the main term (``False`` with
            ``reg_weight=0`` is exactly vanilla).
        reg_sim: ``cos`` (code) or ``dot`` (raw dot products, standard InfoNCE form).
    """

    @dataclass(frozen=True)
    class Params(Strategy.Params):
        reg_weight: float = param(1.0, ge=0)
        reg_temperature: float = param(0.2, gt=0)
        predictor: str = param("none", choices=PREDICTORS)
        predictor_hidden: int = param(2048, ge=1)
        predictor_lr: float = param(1e-4, ge=0)
        predictor_weight_decay: float = param(1e-3, ge=0)
        old_partner_negative: bool = True
        reg_pool_modalities: bool = False
        regularise_first_step: bool = False
        pseudo_negatives: bool = True
        reg_sim: str = param("cos", choices=REG_SIMILARITIES)

    name = "pnr"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.predictors = nn.ModuleDict()
        self._old: dict[str, nn.Linear] = {}
        self._pair: tuple[str, str] | None = None
        self._train_predictors = False
        self._sums: dict[str, float] = {}
        self._count = 0

    # ------------------------------------------------------------------ step boundaries
    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._old, self._train_predictors, self._sums, self._count = {}, False, {}, 0
        self._pair = step.modalities
        if step.index <= 1 and not self.regularise_first_step:
            return
        for m in step.modalities:
            old = copy.deepcopy(self.learners[m]).eval()
            old.requires_grad_(False)
            self._old[m] = old
        if self.predictor == "none" or self.reg_weight == 0:
            return
        device = self.learners[step.modalities[0]].weight.device
        for m in step.modalities:
            if m not in self.predictors:
                # seeded from the step so a resumed run creates the same predictor
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(step.seed)
                    self.predictors[m] = _predictor(self.predictor, self.learners.dim, self.predictor_hidden)
            self.predictors[m].to(device).train()
        self._train_predictors = True

    def optimizer_groups(self, step: StepInfo) -> list[dict[str, Any]]:
        if not self._train_predictors:
            return []
        params = [p for m in step.modalities for p in self.predictors[m].parameters()]
        return [{"params": params, "lr": self.predictor_lr, "weight_decay": self.predictor_weight_decay}]

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._old, self._train_predictors = {}, False
        for module in self.predictors.values():
            module.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ loss
    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        if not self._old:
            return super().losses(batch, out)
        a, b = self._check_pair(batch)
        with torch.no_grad():
            u_old, v_old = self._old[a](batch.xa), self._old[b](batch.xb)
        tau = self.objective.temperature
        if self.pseudo_negatives:
            keep = self.old_partner_negative
            main = two_way(self.objective.direction,
                           lambda: main_term(out.u, out.v, v_old, temperature=tau, old_partner_negative=keep),
                           lambda: main_term(out.v, out.u, u_old, temperature=tau, old_partner_negative=keep))
        else:
            main = self.objective(out.u, out.v)
        losses = {"contrastive_loss": main}
        if self.reg_weight > 0 and len(batch) > 1:
            # (With one row there are no negatives: the regulariser is skipped.)
            z = torch.cat([out.u, out.v])
            z_old = torch.cat([u_old, v_old])
            p = torch.cat([self._predict(a, out.u), self._predict(b, out.v)])
            n = len(batch)
            groups = torch.zeros(2 * n, dtype=torch.long, device=z.device)
            if not self.reg_pool_modalities:
                groups[n:] = 1
            ell = regulariser(p, z, z_old, groups, temperature=self.reg_temperature, similarity=self.reg_sim)
            losses["pnr_reg_loss"] = self.reg_weight * ell.mean()   # = λ_r · ½(mean ℓ^a + mean ℓ^b)
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._count += 1
        return losses

    def _predict(self, m: str, z: torch.Tensor) -> torch.Tensor:
        return self.predictors[m](z) if self._train_predictors else z

    def _check_pair(self, batch: PairedFeatures) -> tuple[str, str]:
        pair = batch.single_pair
        if pair is None or pair != tuple(self._pair):
            raise ValueError(f"PNR trains the step's pair {self._pair}; got a batch of {pair or 'mixed pairs'}")
        return pair

    # ------------------------------------------------------------------ bookkeeping
    def report(self) -> dict[str, float]:
        return {f"pnr/mean_{k}": v / self._count for k, v in self._sums.items()} if self._count else {}

    def state_dict(self) -> dict[str, Any]:
        return {"predictors": {m: {k: t.detach().cpu().clone() for k, t in mod.state_dict().items()}
                               for m, mod in self.predictors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(self.learners.parameters()).device
        self.predictors = nn.ModuleDict()
        for m, params in state.get("predictors", {}).items():
            module = _predictor(self.predictor, self.learners.dim, self.predictor_hidden)
            module.load_state_dict(params)
            self.predictors[m] = module.to(device)

