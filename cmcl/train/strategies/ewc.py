"""Online EWC with an in-batch-negatives Fisher (baselines.md §6).

After each step, a diagonal Fisher of the step's learners is estimated on the step's data and
accumulated online, ``F_m <- gamma_ewc * F_m + F_new_m`` for every stored learner, and the anchor
``theta*_m <- theta_m`` is snapshotted (only the latest is kept). During later steps the loss gets
``lambda_ewc * sum_m sum F_m * (theta_m - theta*_m)^2`` (no 1/2, as mammoth) over the batch's own
learners only, so learners outside the batch keep ``grad is None``.

The Fisher of a batch of one is identically zero for InfoNCE (a softmax over one logit), which
would silently turn EWC into Vanilla (baselines.md §11.4). The Fisher therefore uses in-batch
negatives: the step's rows are shuffled (with the step's seed) and cut into batches of
``fisher_batch``; row i's term is ``l_i = -log softmax_j(u_i . v_j / tau)[i]``, weighted by
``w_i = P_ii`` (the model's probability of the true match), so
``F_new = (1/N) sum_i w_i (grad l_i)^2``. Linear learners make each per-row gradient rank one,
which gives a closed form with one matmul per learner and no per-row autograd:

    delta_i = (sum_j P_ij v_j - v_i) / tau          grad_{W_a} l_i = delta_i x_a_i^T, grad_{c_a} l_i = delta_i
    omega_i = sum_j (P_ij - [i = j]) x_b_j          grad_{W_b} l_i = (u_i / tau) omega_i^T, grad_{c_b} l_i = 0

Under the ``symmetric`` loss the b-to-a rows' terms (same formulas with the roles swapped) are
added: both directions' per-row log-likelihoods count, each unscaled by the loss's 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.objective import two_way
from cmcl.train.strategies.base import Losses, Strategy, param
from cmcl.types import StepInfo

_CHUNK_BATCHES = 128   # Fisher batches processed per vectorised chunk


class _Quadratic(torch.autograd.Function):
    """``1/2 <scaled * (theta - star), theta - star>`` with gradient ``scaled * (theta - star)``.

    With ``scaled = 2 lam F`` this is EWC's ``lam * sum(F (theta - star)^2)``. It is elementwise
    over every weight, so it is written for few memory passes: the difference goes to a reused
    buffer (``work``), the gradient is made once in the forward pass and handed to autograd (one
    backward per forward).
    """

    @staticmethod
    def forward(ctx, theta, star, scaled, work):  # noqa: D102
        diff = torch.sub(theta.detach(), star, out=work)
        grad = torch.mul(diff, scaled)
        ctx.grad = grad
        return 0.5 * torch.dot(grad.view(-1), diff.view(-1))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the EWC penalty supports a single backward pass per forward")
        if grad_out.device.type == "cpu" and float(grad_out) == 1.0:
            return grad, None, None, None           # the usual case: the trainer's loss sum
        return grad.mul_(grad_out), None, None, None


class _PenalisedLinear(torch.autograd.Function):
    """A learner's outputs on the current rows (values already known), with the EWC penalty's
    gradient folded into the weight-gradient matmul: ``grad W = pen_w + Delta^T X`` in one GEMM."""

    @staticmethod
    def forward(ctx, weight, bias, known_out, x, pen_w, pen_b):  # noqa: D102
        ctx.save_for_backward(x)
        ctx.pens = [pen_w, pen_b]
        return known_out.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (x,) = ctx.saved_tensors
        pen_w, pen_b = ctx.pens
        ctx.pens = [None, None]
        gw = grad.T @ x if pen_w is None else pen_w.addmm_(grad.T, x)
        gb = grad.sum(0)
        if pen_b is not None:
            gb = gb + pen_b
        return gw, gb, None, None, None, None


def _direction_terms(u, v, xa, xb, tau):
    """Fisher sums of one direction over equal-size batches (nb, B, d): rows are ``u``'s side.

    Returns ``[F_W_row, F_c_row, F_W_col, F_c_col]``: the row side's weight and bias sums and the
    column side's (its bias gets an exactly zero gradient).
    """
    d = u.shape[-1]
    p = torch.softmax(torch.bmm(u, v.transpose(1, 2)) / tau, dim=-1)           # (nb, B, B)
    w = torch.diagonal(p, dim1=1, dim2=2).reshape(-1, 1)                       # P_ii
    delta = (torch.bmm(p, v) - v).reshape(-1, d) / tau
    p_minus_i = p - torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    omega = torch.bmm(p_minus_i, xb).reshape(-1, d)
    dw = delta.square() * w
    f_w_row = dw.T @ xa.reshape(-1, d).square()
    f_c_row = dw.sum(0)
    f_w_col = ((u.reshape(-1, d) / tau).square() * w).T @ omega.square()
    return [f_w_row, f_c_row, f_w_col, torch.zeros_like(f_c_row)]


def fisher_closed_form(u, v, xa, xb, *, temperature=1.0, direction="a2b"):
    """Sums over rows of ``w_i (grad l_i)^2`` for batches (nb, B, d) of outputs and inputs.

    Returns ``{"a": (F_W, F_c), "b": (F_W, F_c)}``, not yet divided by the number of rows; both
    directions' terms are summed under the symmetric loss.
    """
    def b2a():   # the rows are b's: its terms in the order (a, b)
        terms = _direction_terms(v, u, xb, xa, temperature)
        return terms[2:] + terms[:2]

    fwa, fca, fwb, fcb = two_way(direction, lambda: _direction_terms(u, v, xa, xb, temperature), b2a,
                                 lambda f, b: [x + y for x, y in zip(f, b)])
    return {"a": (fwa, fca), "b": (fwb, fcb)}


class EWC(Strategy):
    """Online elastic weight consolidation of the learners each step trained."""

    @dataclass(frozen=True)
    class Params(Strategy.Params):
        lambda_ewc: float = param(0.5, ge=0)    # weight of the penalty
        gamma_ewc: float = param(1.0, ge=0, le=1)   # decay of the accumulated Fisher
        fisher_batch: int = param(64, ge=2)     # rows per Fisher batch (>= 2: in-batch negatives)

    name = "ewc"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # "<modality>.weight" / "<modality>.bias" -> tensor
        self.fisher: dict[str, torch.Tensor] = {}
        self.star: dict[str, torch.Tensor] = {}
        self._penalty_sum: torch.Tensor | None = None
        self._updates = 0
        self._last_penalty: torch.Tensor | None = None
        self._scaled: dict[str, torch.Tensor] = {}
        self._work: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ penalty
    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._penalty_sum, self._updates, self._last_penalty = None, 0, None
        self._scaled, self._work = {}, {}

    def _scaled_fisher(self, key: str) -> torch.Tensor:
        scaled = self._scaled.get(key)
        if scaled is None:     # 2 lam F, fixed during a step
            scaled = self._scaled[key] = (2.0 * self.lambda_ewc) * self.fisher[key]
            self._work[key] = torch.empty_like(scaled)
        return scaled

    def penalty(self, modalities) -> torch.Tensor | None:
        """The EWC term over the learners of ``modalities`` that have a Fisher (None if none has)."""
        terms = []
        for m in modalities:
            for kind, p in (("weight", self.learners[m].weight), ("bias", self.learners[m].bias)):
                key = f"{m}.{kind}"
                if key in self.fisher:
                    scaled = self._scaled_fisher(key)
                    terms.append(_Quadratic.apply(p, self.star[key], scaled, self._work[key]))
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    @torch.no_grad()
    def _penalty_parts(self, m: str) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """``[2 lam F (W - W*), 2 lam F (c - c*)]`` (None without a Fisher) and the penalty value."""
        pens, value = [], None
        for kind, p in (("weight", self.learners[m].weight), ("bias", self.learners[m].bias)):
            key = f"{m}.{kind}"
            if key not in self.fisher:
                pens.append(None)
                continue
            scaled = self._scaled_fisher(key)
            diff = torch.sub(p, self.star[key], out=self._work[key])
            pen = torch.mul(diff, scaled)
            part = 0.5 * torch.dot(pen.view(-1), diff.view(-1))
            value = part if value is None else value + part
            pens.append(pen)
        return pens, value

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        pair = batch.single_pair
        term = None
        if (self.lambda_ewc > 0 and pair is not None and pair[0] != pair[1] and out.u.requires_grad
                and any(f"{m}.{k}" in self.fisher for m in pair for k in ("weight", "bias"))):
            # Fast path: the penalty's gradient joins each learner's weight-gradient matmul, and
            # the (detached) value is logged; the gradient equals that of the loss form.
            outputs = {}
            for m, known, x in ((pair[0], out.u, batch.xa), (pair[1], out.v, batch.xb)):
                pens, value = self._penalty_parts(m)
                layer = self.learners[m]
                outputs[m] = _PenalisedLinear.apply(layer.weight, layer.bias, known.detach(), x, *pens)
                if value is not None:
                    term = value if term is None else term + value
            out = PairOutput(outputs[pair[0]], outputs[pair[1]])
            losses = super().losses(batch, out)
        else:
            losses = super().losses(batch, out)
            modalities = pair if pair is not None else sorted(set(batch.ma.tolist()) | set(batch.mb.tolist()))
            term = self.penalty(dict.fromkeys(modalities)) if self.lambda_ewc > 0 else None
        if term is None:
            term = out.u.new_zeros(())
        losses["ewc_loss"] = term
        value = term.detach()
        self._penalty_sum = value if self._penalty_sum is None else self._penalty_sum + value
        self._last_penalty = value
        self._updates += 1
        return losses

    # ------------------------------------------------------------------ Fisher
    @torch.no_grad()
    def step_fisher(self, data: PairedFeatures, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``F_new`` of a single-pair step's data (keys ``"<modality>.weight"``/``".bias"``)."""
        pair = data.single_pair
        if pair is None:
            raise ValueError("EWC's Fisher expects the rows of one step (one modality pair)")
        a, b = pair
        n, d, bsz = len(data), data.dim, self.fisher_batch
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        order = order.to(data.xa.device)
        la, lb = self.learners[a], self.learners[b]
        tau, direction = self.objective.temperature, self.objective.direction
        acc = {k: torch.zeros_like(p) for k, p in
               (("aW", la.weight), ("ac", la.bias), ("bW", lb.weight), ("bc", lb.bias))}
        chunk = bsz * _CHUNK_BATCHES
        for lo in range(0, n, chunk):
            rows = order[lo:lo + chunk]
            xa, xb = data.xa[rows], data.xb[rows]
            u, v = la(xa), lb(xb)
            full = (len(rows) // bsz) * bsz
            # equal-size batches, then the last partial batch (kept, as in training)
            for s, e, size in ((0, full, bsz), (full, len(rows), len(rows) - full)):
                if e <= s:
                    continue
                shape = (-1, size, d)
                terms = fisher_closed_form(u[s:e].reshape(shape), v[s:e].reshape(shape), xa[s:e].reshape(shape),
                                           xb[s:e].reshape(shape), temperature=tau, direction=direction)
                acc["aW"] += terms["a"][0]
                acc["ac"] += terms["a"][1]
                acc["bW"] += terms["b"][0]
                acc["bc"] += terms["b"][1]
        return {f"{a}.weight": acc["aW"] / n, f"{a}.bias": acc["ac"] / n,
                f"{b}.weight": acc["bW"] / n, f"{b}.bias": acc["bc"] / n}

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        new = self.step_fisher(data, torch.Generator().manual_seed(step.seed))
        with torch.no_grad():
            if self.gamma_ewc != 1.0:
                for f in self.fisher.values():
                    f.mul_(self.gamma_ewc)
            for key, f in new.items():
                if key in self.fisher:
                    self.fisher[key].add_(f)
                else:
                    self.fisher[key] = f.clone()
            params = {f"{m}.{k}": p for m in self.learners.modalities
                      for k, p in self.learners[m].named_parameters()}
            self.star = {key: params[key].detach().clone() for key in self.fisher}
        self._scaled, self._work = {}, {}

    # ------------------------------------------------------------------ bookkeeping
    def report(self) -> dict[str, float]:
        out: dict[str, float] = {}
        total = 0.0
        for key, f in sorted(self.fisher.items()):
            sq = float(f.double().square().sum())
            total += sq
            m = key.split(".")[0]
            out[f"ewc/fisher_norm/{m}"] = out.get(f"ewc/fisher_norm/{m}", 0.0) + sq
        for k in [k for k in out if k.startswith("ewc/fisher_norm/")]:
            out[k] = out[k] ** 0.5
        out["ewc/fisher_norm"] = total ** 0.5
        out["ewc/fisher_max"] = max((float(f.max()) for f in self.fisher.values()), default=0.0)
        out["ewc/penalty_mean"] = float(self._penalty_sum) / self._updates if self._updates else 0.0
        out["ewc/penalty_last"] = float(self._last_penalty) if self._last_penalty is not None else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": {k: v.cpu() for k, v in self.fisher.items()},
                "star": {k: v.cpu() for k, v in self.star.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(self.learners.parameters()).device
        self.fisher = {k: v.to(device) for k, v in state["fisher"].items()}
        self.star = {k: v.to(device) for k, v in state["star"].items()}
        self._scaled, self._work = {}, {}
