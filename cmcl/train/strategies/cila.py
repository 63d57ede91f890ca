"""CILA on top of Co2L: the distillation weight adapts to the past loss ratio.

Wen et al., ICML 2024 ("Provable contrastive continual learning"). The objective is Co2L's
(:mod:`.co2l`), ``L = L_asym + λ_t L_IRD``, with λ_t fixed for the whole of step t:

* no distillation at step 1; ``λ_2 = 1``;
* for t ≥ 3, ``λ_t = max(1, κ · Σ_{j=2}^{t-1} L̄_dis(j) / Σ_{j=2}^{t-1} L̄_con(j))``, where L̄_dis(j)
  and L̄_con(j) are the raw (unweighted) IRD and asymmetric-contrastive losses averaged over every
  update of step j, and κ = ``balance`` (the CMCL appendix's "balancing coefficient" 5.0).

**Caveat.** The authors published no code. The ``max(1, κ·ratio)`` form and the ``j = 2..t-1``
range come from two independent secondary summaries of the paper's Algorithm 1 (baselines.md §9),
consistent with its abstract; they have not been checked against the paper body. ``rule`` selects
the ablation variants the paper reports: ``"pure"`` (κ·ratio) and ``"min"`` (min(1, κ·ratio)).
Averaging over all updates (rather than Co2L's per-epoch logs) is this implementation's choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cmcl.data.paired import PairedFeatures
from cmcl.train.strategies.base import param
from cmcl.train.strategies.co2l import Co2L, Co2LParams
from cmcl.types import StepInfo

RULES = ("max", "pure", "min")


def cila_coefficient(step_index: int, means: Mapping[int, tuple[float, float]], balance: float,
                     rule: str = "max") -> float:
    """λ_t from the mean losses of earlier steps.

    Args:
        step_index: t, the step about to be trained.
        means: step j -> (mean L_con, mean L_dis) over its updates; entries with j < 2 or j >= t
            are ignored (step 1 has no distillation loss).
        balance: κ.
        rule: ``"max"`` (the method), ``"pure"`` or ``"min"``.

    Returns:
        1.0 when no step in [2, t) has been recorded (so λ_2 = 1), else the rule applied to
        ``balance · ΣL̄_dis / ΣL̄_con``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    used = [means[j] for j in sorted(means) if 2 <= j < step_index]
    con = sum(c for c, _ in used)
    if not used or con <= 0:
        return 1.0
    value = balance * sum(d for _, d in used) / con
    if rule == "max":
        return max(1.0, value)
    if rule == "min":
        return min(1.0, value)
    return value


class CILA(Co2L):
    """Co2L with CILA's adaptive distillation coefficient λ_t."""

    @dataclass(frozen=True)
    class Params(Co2LParams):                   # Co2L's fixed distill_power is replaced by λ_t
        balance: float = param(5.0, ge=0)       # κ, the balancing coefficient of the loss ratio
        rule: str = param("max", choices=RULES)  # "max" (the method), or the ablations "pure" and "min"

    name = "cila"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.means: dict[int, tuple[float, float]] = {}   # step -> (mean L_con, mean L_dis)
        self.lam = 1.0

    def distill_weight(self) -> float:
        return self.lam

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().before_step(step, data)
        self.lam = cila_coefficient(step.index, self.means, self.balance, self.rule)

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().after_step(step, data)
        means = self.step_means()
        if means is not None and self.distilling:
            self.means[step.index] = means
        if self.distilling:
            self._report[f"{self.name}/lambda"] = float(self.lam)

    def state_dict(self) -> dict[str, Any]:
        steps = sorted(self.means)
        return super().state_dict() | {"steps": steps, "con": [self.means[s][0] for s in steps],
                                       "dis": [self.means[s][1] for s in steps]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.means = {int(s): (float(c), float(d)) for s, c, d in zip(state["steps"], state["con"], state["dis"])}
