"""ZO: modality-aware zeroth-order optimisation of one learner ("Branch, or Layer?", arXiv 2506.12409).

At each step one learner of the pair (the *ZO side*) is updated by a two-point zeroth-order
estimate; the other (the *FO side*) by the trainer's back-propagation and AdamW, as usual. The
paper's code is unpublished: the estimator follows its note and ZeroFlow (same group); the choices
marked [ours] in ``docs/strategies.md`` are ours.

How it sits in the hooks (the trainer loop is unchanged):

* ``before_step`` picks the ZO side (``side``) and ``frozen`` names it to the trainer, which keeps
  that learner out of autograd and of its optimizer for the whole step: ``.grad`` is filled for
  the FO learner only, and the trainer's AdamW never steps, decays or keeps moments for the ZO one.
  The ZO update itself writes the ZO learner's parameters in ``after_update``: the method is an
  optimizer of its own (the one documented exception to "strategies never step parameters").
* ``after_update`` (the optimizer has stepped the FO learner) applies the ZO update from the
  outputs ``out`` of the same forward pass, i.e. at the pre-update FO parameters (a simultaneous
  update): draw ``z ~ N(0, I)`` shaped like (W, b) from the step's generator, probe
  ``L(θ ± ε s z)``, ``c = (L₊ - L₋)/(2ε)``, ``ĝ = sign(c)·s z`` (``sign="scalar"``; ``"none"`` gives
  the raw ``c·s z``, ``"elementwise"`` ``sign(c·z)·s``), then, with ``conservative``, keep the best
  of ``{θ, θ - η ĝ, θ + η ĝ}`` on the batch (else ``θ - η ĝ``), then decoupled weight decay
  ``θ ← (1 - η·wd) θ``. ``s = eps_vision/eps`` for a vision-tower learner (vision, video, tactile),
  1 otherwise: the "modality-specific perturbation constraint".

The learner is affine in θ, so ``f(x; θ + k z) = f(x; θ) + k f_z(x)`` with ``f_z(x) = Z_W x + z_b``:
every probe and candidate costs one B×d output shift and a B×B loss, and the parameters are never
touched until the chosen update is written (the probes need no backup and restore is exact).

``mode="dual"`` makes both learners ZO (one joint perturbation; the paper's memory configuration);
no learner takes a gradient then, so ``losses`` adds ``0 ×`` a private scalar leaf to give the
trainer's backward a graph (the loss value is unchanged and no learner gets a ``.grad``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Strategy, param
from cmcl.types import StepInfo

#: Modalities encoded by the vision tower of the binding encoders (method.md).
VISION_TOWER = frozenset({"vision", "video", "tactile"})
SIDES = ("rule", "auto", "a", "b")
MODES = ("single", "dual")
SIGNS = ("scalar", "elementwise", "none")


def rule_side(pair: tuple[str, str]) -> str:
    """The ZO modality by the default rule: text; else the one not on the vision tower; else ``b``."""
    a, b = pair
    if "text" in pair:
        return "text"
    if (a in VISION_TOWER) != (b in VISION_TOWER):
        return b if a in VISION_TOWER else a
    return b


class ZO(Strategy):
    """One learner updated by a conservative, sign-normalised two-point estimate; the other by AdamW.

    Hyperparameters:
        lr_zo: η_z, the ZO learner's SGD learning rate (0: the frozen-side control).
        eps: ε, the perturbation of a non-vision-tower learner.
        eps_vision: ε_v, the perturbation of a vision-tower learner; its step is scaled by ε_v/ε.
        sign: ``scalar`` (sign of the projected gradient), ``elementwise`` or ``none`` (raw SPSA).
        conservative: keep the best of three candidates instead of always stepping.
        side: ``rule`` (text > not vision-tower > second listed), ``auto`` (lower estimate
            variance, measured at step start), or ``a``/``b`` (a fixed position in the pair).
        mode: ``single`` (one ZO learner) or ``dual`` (both; reproduces the paper's Dual-ZO).
        queries: q, estimates averaged per update.
        weight_decay_zo: decoupled weight decay of the ZO learner (the toolkit's AdamW value).
        auto_draws, auto_batches: estimates and batches per side for ``side=auto``.
        track_drift: keep a CPU copy of the ZO parameters at step start to report how far they moved.
    """

    @dataclass(frozen=True)
    class Params(Strategy.Params):
        lr_zo: float = param(1e-4, ge=0)
        eps: float = param(1e-3, gt=0)
        eps_vision: float = param(5e-4, gt=0)
        sign: str = param("scalar", choices=SIGNS)
        conservative: bool = True
        side: str = param("rule", choices=SIDES)
        mode: str = param("single", choices=MODES)
        queries: int = param(1, ge=1)
        weight_decay_zo: float = param(1e-3, ge=0)
        auto_draws: int = param(16, ge=2)
        auto_batches: int = param(2, ge=1)
        track_drift: bool = True

    name = "zo"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._zo: tuple[str, ...] = ()       # ZO modalities of the current step
        self._pair: tuple[str, str] | None = None
        self._gen: torch.Generator | None = None
        self._start: dict[str, torch.Tensor] = {}
        self._stats: dict[str, float] = {}

    # ------------------------------------------------------------------ step boundaries
    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._pair = step.modalities
        device = self.learners[step.modalities[0]].weight.device
        self._gen = torch.Generator(device=device).manual_seed(step.seed)
        self._stats = {"updates": 0.0, "accepted": 0.0}
        if self.mode == "dual":
            self._zo = tuple(step.modalities)
        elif self.side == "rule":
            self._zo = (rule_side(step.modalities),)
        elif self.side in ("a", "b"):
            self._zo = (step.modalities[0 if self.side == "a" else 1],)
        else:
            self._zo = (self._auto_side(step, data),)
        self._start = ({m: torch.cat([p.detach().flatten() for p in self.learners[m].parameters()]).cpu()
                        for m in self._zo} if self.track_drift else {})

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        for m in self._zo:
            if m in self._start:
                now = torch.cat([p.detach().flatten() for p in self.learners[m].parameters()]).cpu()
                self._stats[f"drift/{m}"] = float(torch.linalg.vector_norm(now - self._start[m]))
        self._start = {}

    def _scale(self, m: str) -> float:
        return self.eps_vision / self.eps if m in VISION_TOWER else 1.0

    # ------------------------------------------------------------------ the estimate
    def _draw(self, modalities: tuple[str, ...], draws: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``s_m z`` for each ZO learner: ``draws`` samples shaped like (weight, bias)."""
        out = {}
        for m in modalities:
            w, b = self.learners[m].weight, self.learners[m].bias
            zw = torch.randn((draws, *w.shape), generator=self._gen, device=w.device, dtype=w.dtype)
            zb = torch.randn((draws, *b.shape), generator=self._gen, device=b.device, dtype=b.dtype)
            s = self._scale(m)
            if s != 1.0:
                zw.mul_(s)
                zb.mul_(s)
            out[m] = (zw, zb)
        return out

    def _loss_at(self, y: dict[str, torch.Tensor], shift: dict[str, torch.Tensor], k: float) -> float:
        """Batch loss with the ZO outputs moved by ``k`` times ``shift`` (i.e. at θ + k·ĝ)."""
        u = y["a"] + k * shift["a"] if "a" in shift else y["a"]
        v = y["b"] + k * shift["b"] if "b" in shift else y["b"]
        return float(self.objective(u, v))

    @staticmethod
    def _sides(pair: tuple[str, str], modalities: tuple[str, ...]) -> dict[str, str]:
        return {("a" if m == pair[0] else "b"): m for m in modalities}

    def estimate(self, xa: torch.Tensor, xb: torch.Tensor, y: dict[str, torch.Tensor],
                 modalities: tuple[str, ...], draws: int = 1
                 ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """``draws`` two-point estimates at once: ``(c, s z, output shifts)``, each with a leading draw axis.

        ``c_k = (L(θ + ε s z_k) - L(θ - ε s z_k)) / 2ε``, so ``c_k · s z_k`` is the k-th raw estimate
        of the gradient with respect to the ZO parameters. ``y`` holds the current outputs
        ``{"a": u, "b": v}`` (detached); the parameters themselves are never written.
        """
        sz = self._draw(modalities, draws)
        x = {"a": xa, "b": xb}
        shift = {side: torch.einsum("ni,koi->kno", x[side], sz[m][0]) + sz[m][1][:, None, :]
                 for side, m in self._sides(self._pair, modalities).items()}
        loss = torch.func.vmap(self.objective)

        def at(k: float) -> torch.Tensor:
            u = y["a"] + k * shift["a"] if "a" in shift else y["a"].expand(draws, *y["a"].shape)
            v = y["b"] + k * shift["b"] if "b" in shift else y["b"].expand(draws, *y["b"].shape)
            return loss(u, v)

        c = (at(self.eps) - at(-self.eps)) / (2 * self.eps)
        return c, sz, shift

    def direction(self, xa: torch.Tensor, xb: torch.Tensor, y: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """ĝ (the mean of ``queries`` estimates, normalised by ``sign``) and its output shift per side."""
        c, sz, shift = self.estimate(xa, xb, y, self._zo, self.queries)
        coef = c if self.sign == "none" else torch.sign(c)
        x = {"a": xa, "b": xb}
        steps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        shifts: dict[str, torch.Tensor] = {}
        for side, m in self._sides(self._pair, self._zo).items():
            zw, zb = sz[m]
            if self.sign == "elementwise":
                # sign(c·z) element by element, still scaled by s for a vision-tower learner
                s = self._scale(m)
                zw.sign_().mul_(coef.view(-1, 1, 1) * s)
                zb.sign_().mul_(coef.view(-1, 1) * s)
            else:
                zw.mul_(coef.view(-1, 1, 1))
                zb.mul_(coef.view(-1, 1))
                shift[side].mul_(coef.view(-1, 1, 1))
            # in place for q = 1: no second copy of a d×d tensor
            gw, gb = (zw[0], zb[0]) if self.queries == 1 else (zw.mean(0), zb.mean(0))
            steps[m] = (gw, gb)
            if self.sign == "elementwise":
                shifts[side] = x[side] @ gw.T + gb
            else:
                shifts[side] = shift[side][0] if self.queries == 1 else shift[side].mean(0)
        return steps, shifts

    # ------------------------------------------------------------------ hooks
    def frozen(self, step: StepInfo) -> tuple[str, ...]:
        """The ZO learners: the trainer's first-order optimizer never touches them."""
        return self._zo

    def after_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        pair = batch.single_pair
        if pair is None or pair != tuple(self._pair):
            raise ValueError(f"ZO trains the step's pair {self._pair}; got a batch of {pair or 'mixed pairs'}")
        self._stats["updates"] += 1
        if self.lr_zo == 0:
            return
        y = {"a": out.u.detach(), "b": out.v.detach()}
        with torch.no_grad():
            steps, shifts = self.direction(batch.xa, batch.xb, y)
            k = -self.lr_zo
            if self.conservative:
                # candidates θ, θ - ηĝ, θ + ηĝ: exact argmin of the batch loss (ties keep θ)
                best, k = float(self.objective(y["a"], y["b"])), 0.0
                for cand in (-self.lr_zo, self.lr_zo):
                    loss = self._loss_at(y, shifts, cand)
                    if loss < best:
                        best, k = loss, cand
            if k != 0.0:
                self._stats["accepted"] += 1
                for m, (gw, gb) in steps.items():
                    self.learners[m].weight.add_(gw, alpha=k)
                    self.learners[m].bias.add_(gb, alpha=k)
            if self.weight_decay_zo:
                for m in self._zo:
                    for p in self.learners[m].parameters():
                        p.mul_(1 - self.lr_zo * self.weight_decay_zo)

    # ------------------------------------------------------------------ side = auto
    def _auto_side(self, step: StepInfo, data: PairedFeatures) -> str:
        """The side whose raw estimates ``c·z`` vary less, on ``auto_batches`` batches of 64."""
        gen = torch.Generator().manual_seed(step.seed + 1)
        order = torch.randperm(len(data), generator=gen)
        variance = {}
        with torch.no_grad():
            for m in step.modalities:
                total = 0.0
                for i in range(self.auto_batches):
                    rows = order[i * 64:(i + 1) * 64]
                    if len(rows) < 2:
                        break
                    batch = data.select(rows)
                    y = {"a": self.learners[step.modalities[0]](batch.xa), "b": self.learners[step.modalities[1]](batch.xb)}
                    sq, mean = 0.0, None
                    for _ in range(self.auto_draws):   # one at a time: a draw is d² + d floats
                        c, sz, _shift = self.estimate(batch.xa, batch.xb, y, (m,))
                        flat = torch.cat([sz[m][0].flatten(), sz[m][1].flatten()]) * c
                        sq += float(flat @ flat)
                        mean = flat if mean is None else mean + flat
                    mean = mean / self.auto_draws
                    total += sq / self.auto_draws - float(mean @ mean)
                variance[m] = total
                self._stats[f"auto_variance/{m}"] = total
        a, b = step.modalities
        return a if variance[a] < variance[b] else b

    # ------------------------------------------------------------------ bookkeeping
    def report(self) -> dict[str, float]:
        out = {f"zo/{k}": float(v) for k, v in self._stats.items() if k not in ("updates", "accepted")}
        if self._stats.get("updates"):
            out["zo/accept_rate"] = self._stats["accepted"] / self._stats["updates"]
        if self._pair is not None:
            for i, m in enumerate(self._pair):
                out[f"zo/is_zo/{'ab'[i]}"] = float(m in self._zo)
        return out
