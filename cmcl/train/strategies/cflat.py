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

import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Closure, Losses
from cmcl.train.strategies.co2l import Co2L
from cmcl.types import StepInfo

_EPS = 1e-12  # the reference's perturb_eps


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors (a 0-d tensor; no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class CFlat(Co2L):
    """Co2L's loss minimised with C-Flat's zeroth- plus first-order flatness gradient."""

    name = "cflat"

    def __init__(self, *, buffer_size: int = 256, distill_power: float = 1.0, kappa: float = 0.2,
                 kappa_past: float = 0.01, temperature: float | None = None,
                 rho: float = 0.2, lambda_cf: float = 0.2) -> None:
        """Co2L's hyperparameters plus C-Flat's.

        Args:
            rho: ρ, the radius of every perturbation.
            lambda_cf: λ, the weight of the first-order flatness term ``g3 - g2``.
        """
        super().__init__(buffer_size=buffer_size, distill_power=distill_power, kappa=kappa,
                         kappa_past=kappa_past, temperature=temperature)
        if rho < 0 or lambda_cf < 0:
            raise ValueError("rho and lambda_cf must be >= 0")
        self.rho = float(rho)
        self.lambda_cf = float(lambda_cf)
        self._norms: torch.Tensor | None = None

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().before_step(step, data)
        self._norms = None

    def compute_gradients(self, closure: Closure) -> tuple[Losses, PairOutput]:
        self._cache_targets, self._targets = True, None
        try:
            first = closure()
            if self._raw is not None:
                self._record()
            self._flat_gradient(closure)
        finally:
            self._cache_targets, self._targets = False, None
        return first

    def _flat_gradient(self, closure: Closure) -> None:
        """Steps 2-5 above, given ``g0`` in ``.grad``; leaves ``g_cf`` in ``.grad`` and θ restored."""
        params = [p for p in self.learners.parameters() if p.grad is not None]
        if not params:
            return
        rho = self.rho
        # The closure zeroes with set_to_none, so each call's gradients are fresh tensors and the
        # previous ones can be kept by reference without copying.
        g0 = [p.grad for p in params]
        with torch.no_grad():
            theta = [p.detach().clone() for p in params]
            n0 = _norm(g0)
            e0 = torch._foreach_mul(g0, rho / (n0 + _EPS))
            torch._foreach_add_(params, e0)
        closure()
        g1 = [p.grad for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, theta)
            h = torch._foreach_sub(g1, g0)
            nh = _norm(h)
            e1 = torch._foreach_mul(h, rho / (nh + _EPS))
            torch._foreach_add_(params, e1)
        closure()
        g2 = [p.grad for p in params]
        with torch.no_grad():
            n2 = _norm(g2)
            e2 = torch._foreach_mul(g2, rho / (n2 + _EPS))
            torch._foreach_add_(params, e2)
        closure()
        with torch.no_grad():
            # Restore θ from the saved copy (exact; subtracting e1 + e2 could move a value by 1 ulp).
            torch._foreach_copy_(params, theta)
            g3 = [p.grad for p in params]
            torch._foreach_sub_(g3, g2)
            n_flat = _norm(g3)
            torch._foreach_mul_(g3, self.lambda_cf)
            torch._foreach_add_(g3, g1)          # .grad now holds g_cf = g1 + λ (g3 - g2)
            norms = torch.stack([n0, _norm(e0), nh, _norm(e1), n2, _norm(e2), n_flat, _norm(g3)]).float()
        self._norms = norms if self._norms is None else self._norms + norms

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().after_step(step, data)
        if self._norms is not None and self._updates:
            names = ("grad_norm", "e0_norm", "h_norm", "e1_norm", "g2_norm", "e2_norm", "flat_norm", "cf_grad_norm")
            for key, value in zip(names, (self._norms / self._updates).tolist()):
                self._report[f"{self.name}/{key}"] = value
