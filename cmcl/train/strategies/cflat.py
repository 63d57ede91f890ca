"""C-Flat on top of Co2L: a flatness-seeking gradient from four evaluations of the Co2L loss.

Bian et al., NeurIPS 2024 (the official ``optims/c_flat.py`` update, baselines.md §8). With J the
Co2L loss of the current batch, norms taken over every parameter that has a gradient and
``ĝ = g/(‖g‖ + 1e-12)``:

1. ``g0 = ∇J(θ)``;
2. ``g1 = ∇J(θ + ρ ĝ0)`` (the SAM gradient);
3. ``h = g1 - g0`` (≈ ρ H ĝ0), ``θ' = θ + ρ ĥ``, ``g2 = ∇J(θ')``;
4. ``g3 = ∇J(θ' + ρ ĝ2)``;
5. ``g_cf = g1 + λ (g3 - g2)`` goes to the optimizer, θ is restored.

The first evaluation is the trainer's closure inside :meth:`CFlat.compute_gradients` (the torch
``optimizer.step(closure)`` idiom), and its losses are returned, so the logged loss is the one at θ.
Learners outside the batch have ``grad is None`` and are never perturbed. The teacher's IRD targets
do not depend on θ and are computed once per update.

``route="outputs"`` (the default) takes the other three evaluations in the learners' output space.
The learners are affine and J depends on θ only through the batch's outputs, so every gradient
here is ``Σ_e Δ_e [x_e, 1]`` over the batch's entries e (a row's a or b side) of each learner, Δ the
loss's gradient with respect to the outputs. A parameter step ``c Σ_e Δ_e [x_e, 1]`` moves the
outputs by ``c K Δ`` with ``K_fe = [same learner] (x_f·x_e + 1)``, and ``‖Σ_e Δ_e [x_e, 1]‖² =
Σ (K ⊙ Δ Δᵀ)``: the perturbed points' outputs, the norms and ``g_cf`` follow from K (2n × 2n) and
the output gradients, without forming a perturbed weight or a weight gradient in between, and
``g_cf`` is written as one product per learner. It equals the reference's loop in exact arithmetic
and differs from it by float32 rounding (tested against ``route="closure"`` in float64). An update
where the first call's gradient norm is not the one its output gradients give (something besides
the outputs fed ``.grad``), or whose batch the closure did not score through :meth:`losses`, takes
the closure route; ``cflat/outputs_route`` reports the share of updates that took the outputs route.

``route="closure"`` calls the trainer's closure four times at materialised perturbed weights, as
the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Closure, Losses, param, total_loss
from cmcl.train.strategies.co2l import Co2L
from cmcl.types import StepInfo

_EPS = 1e-12  # the reference's perturb_eps
ROUTES = ("outputs", "closure")


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors (a 0-d tensor; no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class CFlat(Co2L):
    """Co2L's loss minimised with C-Flat's zeroth- plus first-order flatness gradient."""

    @dataclass(frozen=True)
    class Params(Co2L.Params):
        rho: float = param(0.2, ge=0)           # ρ, the radius of every perturbation
        lambda_cf: float = param(0.2, ge=0)     # λ, the weight of the first-order flatness term g3 - g2
        route: str = param("outputs", choices=ROUTES)   # how evaluations 2-4 run (same algorithm)

    name = "cflat"
    output_grads = True   # dL/du, dL/dv of the first evaluation on out: the outputs route

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._norms: list[tuple[float, ...]] = []
        self._work: dict[int, torch.Tensor] = {}   # id(parameter) -> perturbed-point storage
        self._scored: tuple[PairedFeatures, PairOutput] | None = None
        self._routes = [0, 0]                      # updates by the outputs route, by the closure route

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().before_step(step, data)
        self._norms, self._work, self._routes = [], {}, [0, 0]

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        self._scored = (batch, out)
        return super().losses(batch, out)

    def compute_gradients(self, closure: Closure) -> tuple[Losses, PairOutput]:
        with self.same_batch():
            self._scored = None
            first = closure()
            self._record()                  # the loss terms at θ, not at the perturbed points
            scored, self._scored = self._scored, None
            if not (self.route == "outputs" and scored is not None and scored[1] is first[1]
                    and self._flat_gradient_outputs(*scored)):
                self._routes[1] += 1
                self._flat_gradient(closure)
            else:
                self._routes[0] += 1
            self._scored = None             # the outputs route's own scorings passed through losses()
        return first

    # ------------------------------------------------------------------ the outputs route
    def _entries(self, batch: PairedFeatures, out: PairOutput) -> dict[str, Any] | None:
        """The batch's entries (a sides, then b sides): inputs, output gradients and, per learner
        with a gradient, its entries; None where the outputs route does not apply."""
        if out.extra or out.u.grad is None or out.v.grad is None or self.learners.grad_inputs:
            return None
        names = np.concatenate([np.asarray(batch.ma).astype(str), np.asarray(batch.mb).astype(str)])
        x = torch.cat([batch.xa, batch.xb])
        members, params = {}, []
        for m in np.unique(names):
            layer = self.learners[str(m)]
            grads = [layer.weight.grad, None if layer.bias is None else layer.bias.grad]
            if grads[0] is None and grads[1] is None:
                continue                    # a frozen learner: not perturbed, not in the norms
            if layer.bias is None or grads[0] is None or grads[1] is None or x.dtype != layer.weight.dtype:
                return None
            members[str(m)] = torch.as_tensor(np.flatnonzero(names == m), device=x.device)
            params.append((layer.weight, layer.bias))
        n_params = sum(1 for p in self.learners.parameters() if p.grad is not None)
        if not members or n_params != 2 * len(members):
            return None                     # a gradient that is not a batch learner's
        same = torch.zeros(len(names), len(names), dtype=torch.bool, device=x.device)
        for rows in members.values():
            same[rows[:, None], rows[None, :]] = True
        kernel = torch.addmm(torch.ones((), dtype=x.dtype, device=x.device), x, x.T).mul_(same)
        return {"x": x, "kernel": kernel, "members": members, "params": params,
                "delta": torch.cat([out.u.grad, out.v.grad]), "outputs": torch.cat([out.u, out.v]).detach()}

    def _output_grads(self, batch: PairedFeatures, outputs: torch.Tensor) -> torch.Tensor:
        """Δ at the given outputs: the gradient of the loss terms the trainer sums."""
        n = len(batch)
        u, v = outputs[:n].detach().requires_grad_(True), outputs[n:].detach().requires_grad_(True)
        with torch.enable_grad():
            total = total_loss(self.losses(batch, PairOutput(u, v)))
            du, dv = torch.autograd.grad(total, [u, v], allow_unused=True)
        return torch.cat([torch.zeros_like(u) if du is None else du, torch.zeros_like(v) if dv is None else dv])

    def _flat_gradient_outputs(self, batch: PairedFeatures, out: PairOutput) -> bool:
        """Steps 2-5 in output space (module docstring); False, with nothing changed, where the
        route does not apply."""
        e = self._entries(batch, out)
        if e is None:
            return False
        kernel, d0, o0 = e["kernel"], e["delta"], e["outputs"]

        def sq_norm(delta: torch.Tensor) -> float:
            return float((kernel * (delta @ delta.T)).double().sum())

        with torch.no_grad():
            n0 = float(_norm([p for pair in e["params"] for p in (pair[0].grad, pair[1].grad)]))
            # the first gradient is the outputs' alone (nothing else wrote into .grad)
            if abs(sq_norm(d0) - n0 * n0) > 1e-4 * n0 * n0 + 1e-30:
                return False
            rho = self.rho
            s0 = rho / (n0 + _EPS)
            d1 = self._output_grads(batch, o0 + s0 * (kernel @ d0))             # at θ + e0
            dh = d1 - d0                                                        # h = g1 - g0
            nh = max(sq_norm(dh), 0.0) ** 0.5
            s1 = rho / (nh + _EPS)
            o_prime = o0 + s1 * (kernel @ dh)                                   # at θ' = θ + e1
            d2 = self._output_grads(batch, o_prime)
            n2 = max(sq_norm(d2), 0.0) ** 0.5
            s2 = rho / (n2 + _EPS)
            d3 = self._output_grads(batch, o_prime + s2 * (kernel @ d2))        # at θ' + e2
            flat = d3 - d2
            n_flat = max(sq_norm(flat), 0.0) ** 0.5
            cf = flat.mul_(self.lambda_cf).add_(d1)                             # g1 + λ (g3 - g2)
            for (weight, bias), rows in zip(e["params"], e["members"].values()):
                torch.mm(cf[rows].T, e["x"][rows], out=weight.grad)
                torch.sum(cf[rows], dim=0, out=bias.grad)
        self._norms.append((n0, s0 * n0, nh, s1 * nh, n2, s2 * n2, n_flat))
        return True

    # ------------------------------------------------------------------ the closure route

    def _flat_gradient(self, closure: Closure) -> None:
        """Steps 2-5 above, given ``g0`` in ``.grad``; leaves ``g_cf`` in ``.grad`` and θ restored.

        The perturbed points are written into a workspace reused across updates and swapped in as
        the parameters' storage; θ's own storage is swapped back at the end, so θ is restored
        bit-exactly (subtracting e1 + e2, as the reference does, can move a value by 1 ulp) and no
        parameter-sized tensor is allocated (fresh large allocations cost several passes each on
        CPU). Each closure call zeroes with ``set_to_none``, so earlier gradients are kept by
        reference. Besides the four closures this is about 22 passes over θ_cur.
        """
        params = [p for p in self.learners.parameters() if p.grad is not None]
        if not params:
            return
        rho = self.rho
        theta = [p.data for p in params]
        work = [self._workspace(p) for p in params]
        g0 = [p.grad for p in params]
        with torch.no_grad():
            n0 = float(_norm(g0))
            s0 = rho / (n0 + _EPS)
            for p, t, g, w in zip(params, theta, g0, work):
                torch.add(t, g, alpha=s0, out=w)            # θ + e0
                p.data = w
        closure()
        g1 = [p.grad for p in params]
        with torch.no_grad():
            torch._foreach_sub_(g0, g1)                     # g0 is not needed again: now -h
            nh = float(_norm(g0))
            s1 = rho / (nh + _EPS)
            for t, g, w in zip(theta, g0, work):
                torch.add(t, g, alpha=-s1, out=w)           # θ' = θ + e1
        closure()
        g2 = [p.grad for p in params]
        with torch.no_grad():
            n2 = float(_norm(g2))
            s2 = rho / (n2 + _EPS)
            torch._foreach_add_(work, g2, alpha=s2)         # θ' + e2
        closure()
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.data = t                                  # θ, bit-exact
            g3 = [p.grad for p in params]
            torch._foreach_sub_(g3, g2)
            n_flat = float(_norm(g3))
            torch._foreach_add_(g1, g3, alpha=self.lambda_cf)
            for p, g in zip(params, g1):
                p.grad = g                                  # g_cf = g1 + λ (g3 - g2)
        # ‖e_k‖ = ρ‖g‖/(‖g‖ + ε): ρ, or 0 where a gradient vanishes (C-Flat silently inactive).
        self._norms.append((n0, s0 * n0, nh, s1 * nh, n2, s2 * n2, n_flat))

    def _workspace(self, p: torch.nn.Parameter) -> torch.Tensor:
        w = self._work.get(id(p))
        if w is None or w.shape != p.shape or w.dtype != p.dtype or w.device != p.device:
            w = self._work[id(p)] = torch.empty_like(p.data)
        return w

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().after_step(step, data)
        if self._norms:
            names = ("grad_norm", "e0_norm", "h_norm", "e1_norm", "g2_norm", "e2_norm", "flat_norm")
            for i, key in enumerate(names):
                self._report[f"{self.name}/{key}"] = sum(n[i] for n in self._norms) / len(self._norms)
        if sum(self._routes):
            self._report[f"{self.name}/outputs_route"] = self._routes[0] / sum(self._routes)
