"""DER and DER++: dark experience replay of matched-pair scores (baselines.md §4, §5).

There are no class logits in contrastive pair training; the "logit" DER distils is the score of a
pair, ``s_i = <f_a(x_a_i), f_b(x_b_i)> / tau`` (what the reference ``Base.forward`` returns), each
row scored with its own modalities' learners (a replay batch mixes modality pairs).

* Buffer: reservoir sampling (policy R), ``buffer_size`` records. After every optimizer update the
  batch is offered together with its detached scores from the *same* forward pass, i.e. the
  scores of the parameters before that update.
* DER: ``L = L_base + alpha * mean_i (s_i(theta) - s*_i)^2`` over ``replay_batch`` records drawn
  uniformly without replacement; active as soon as the buffer holds anything (step 1 included).
* DER++: adds ``beta * mean_j softplus(-s_j(theta))`` (binary cross-entropy of the "same
  instance" label 1) over a second, independent draw. The CMCL appendix calls this weight alpha;
  DER's paper and mammoth call it beta (baselines.md §11.3).

Parameter scope (baselines.md §1): only the learners of the current batch's pair are trained.
A replayed pair whose modality is outside that pair goes through its learner without gradient (a
constant for this step), so every other learner keeps ``grad is None`` and stays bit-identical;
a stored pair that shares no learner with the current pair adds a constant to the mean.

Each draw has its own generator (all seeded from ``StepInfo.seed``), so DER++ with ``beta = 0``
performs exactly DER's updates.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Losses, Strategy
from cmcl.train.strategies.buffer import ReplayBuffer
from cmcl.types import StepInfo


def buffer_report(buffer: ReplayBuffer) -> dict[str, float]:
    """Buffer diagnostics: stored pairs per protocol step (``buffer/step_3``), size and offers."""
    out = {f"buffer/step_{s}": float(c) for s, c in sorted(buffer.composition().items())}
    out["buffer/size"] = float(len(buffer))
    out["buffer/offers"] = float(buffer.offers)
    return out


def pair_scores(out: PairOutput, temperature: float) -> torch.Tensor:
    """Row-wise matched-pair scores ``<u_i, v_i> / tau``."""
    s = (out.u * out.v).sum(dim=1)
    return s if temperature == 1.0 else s / temperature


def scoped_scores(learners, rows: PairedFeatures, trainable: set[str], temperature: float) -> torch.Tensor:
    """Pair scores of mixed-pair ``rows``; learners outside ``trainable`` run without gradient."""
    def side(names: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        def apply(m: str, xm: torch.Tensor) -> torch.Tensor:
            if m in trainable:
                return learners[m](xm)
            with torch.no_grad():
                return learners[m](xm)
        kinds = np.unique(names)
        if len(kinds) == 1:
            return apply(str(kinds[0]), x)
        out = x.new_empty(x.shape)
        for m in kinds:        # one matmul per distinct modality
            idx = torch.as_tensor(np.flatnonzero(names == m), device=x.device)
            out = out.index_put((idx,), apply(str(m), x[idx]))
        return out
    return pair_scores(PairOutput(side(rows.ma, rows.xa), side(rows.mb, rows.xb)), temperature)


class DER(Strategy):
    """Dark experience replay: distil the stored pair scores of a reservoir buffer."""

    name = "der"

    def __init__(self, *, alpha: float = 0.1, buffer_size: int = 256, replay_batch: int = 64) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if replay_batch < 1:
            raise ValueError(f"replay_batch must be >= 1, got {replay_batch}")
        self.alpha = float(alpha)
        self.beta = 0.0
        self.replay_batch = int(replay_batch)
        self.buffer = ReplayBuffer(int(buffer_size), extras={"score": ()})
        self._seed = 0
        self._gens: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ per step
    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        # One generator per random choice, so adding DER++'s draw never shifts DER's.
        self._gens = {k: torch.Generator().manual_seed((step.seed + i) % (1 << 63))
                      for i, k in enumerate(("offer", "replay", "gt"))}

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        losses = super().losses(batch, out)
        zero = out.u.new_zeros(())
        if self.buffer.is_empty:
            losses["der_loss"] = zero
            if self.beta > 0:
                losses["gt_loss"] = zero
            return losses
        tau = self.objective.temperature
        trainable = set(batch.ma.tolist()) | set(batch.mb.tolist()) if batch.single_pair is None \
            else set(batch.single_pair)
        replay, extras = self.buffer.sample(self.replay_batch, self._gens["replay"])
        if self.beta > 0:
            # Second, independent draw; both scored in one grouped forward pass.
            gt, _ = self.buffer.sample(self.replay_batch, self._gens["gt"])
            scores = scoped_scores(self.learners, PairedFeatures.concat([replay, gt]), trainable, tau)
            s_replay, s_gt = scores[:len(replay)], scores[len(replay):]
            losses["gt_loss"] = self.beta * F.softplus(-s_gt).mean()
        else:
            s_replay = scoped_scores(self.learners, replay, trainable, tau)
        losses["der_loss"] = self.alpha * (s_replay - extras["score"]).pow(2).mean()
        return losses

    def after_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        # `out` is the forward pass that produced this update's gradient: pre-update scores.
        scores = pair_scores(PairOutput(out.u.detach(), out.v.detach()), self.objective.temperature)
        self.buffer.add_reservoir(batch, self._gens["offer"], {"score": scores})

    # ------------------------------------------------------------------ bookkeeping
    def report(self) -> dict[str, float]:
        return buffer_report(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(self.learners.parameters()).device
        self.buffer.load_state_dict(state["buffer"], device=device)
