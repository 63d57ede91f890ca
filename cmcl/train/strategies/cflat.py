"""C-Flat on top of Co2L: a flatness-seeking gradient from four evaluations of the Co2L loss.

Bian et al., NeurIPS 2024 (the official ``optims/c_flat.py`` update, baselines.md §8). With J the
Co2L loss of the current batch, norms taken over every parameter that has a gradient and
``ĝ = g/(‖g‖ + 1e-12)``:

1. ``g0 = ∇J(θ)``;
2. ``g1 = ∇J(θ + ρ ĝ0)`` (the SAM gradient);
3. ``h = g1 - g0`` (≈ ρ H ĝ0), ``θ' = θ + ρ ĥ``, ``g2 = ∇J(θ')``;
4. ``g3 = ∇J(θ' + ρ ĝ2)``;
5. ``g_cf = g1 + λ (g3 - g2)`` goes to the optimizer, θ is restored.

The four evaluations are four calls of the trainer's closure inside :meth:`CFlat.compute_gradients`
(the torch ``optimizer.step(closure)`` idiom); the first call's losses are returned, so the
logged loss is the one at θ. Learners outside the batch have ``grad is None`` in every call and are
never perturbed. The teacher's IRD targets do not depend on θ and are computed once per update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Closure, Losses, param
from cmcl.train.strategies.co2l import Co2L
from cmcl.types import StepInfo

_EPS = 1e-12  # the reference's perturb_eps


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors (a 0-d tensor; no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class CFlat(Co2L):
    """Co2L's loss minimised with C-Flat's zeroth- plus first-order flatness gradient."""

    @dataclass(frozen=True)
    class Params(Co2L.Params):
        rho: float = param(0.2, ge=0)           # ρ, the radius of every perturbation
        lambda_cf: float = param(0.2, ge=0)     # λ, the weight of the first-order flatness term g3 - g2

    name = "cflat"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._norms: list[tuple[float, ...]] = []
        self._work: dict[int, torch.Tensor] = {}   # id(parameter) -> perturbed-point storage

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().before_step(step, data)
        self._norms, self._work = [], {}

    def compute_gradients(self, closure: Closure) -> tuple[Losses, PairOutput]:
        with self.same_batch():
            first = closure()
            self._record()                  # the loss terms at θ, not at the perturbed points
            self._flat_gradient(closure)
        return first

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
