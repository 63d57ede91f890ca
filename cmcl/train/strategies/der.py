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

Parameter scope (baselines.md §1): only the learners of the step's pair are trained. A replayed
side whose modality is outside that pair is a constant for the whole step: its output is computed
once in ``before_step`` and cached per buffer slot, so every other learner keeps ``grad is None``
and stays bit-identical. The drawn rows of a trainable learner go through the trainer's product
for the batch (``extra_inputs``), so each update runs one forward and one weight-gradient product
per trainable learner. A stored pair that shares no learner with the current pair adds a constant
to the mean.

Each draw has its own generator (all seeded from ``StepInfo.seed``), so DER++ with ``beta = 0``
performs exactly DER's updates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Losses, param
from cmcl.train.strategies.buffer import Replay
from cmcl.types import StepInfo


def pair_scores(out: PairOutput, temperature: float) -> torch.Tensor:
    """Row-wise matched-pair scores ``<u_i, v_i> / tau``."""
    s = (out.u * out.v).sum(dim=1)
    return s if temperature == 1.0 else s / temperature


class DER(Replay):
    """Dark experience replay: distil the stored pair scores of a reservoir buffer."""

    @dataclass(frozen=True)
    class Params(Replay.Params):
        alpha: float = param(0.1, ge=0)         # weight of the score distillation
        replay_batch: int = param(64, ge=1)     # records drawn per update

    name = "der"
    reservoir = True
    buffer_extras = {"score": ()}
    beta = 0.0                                  # DER++'s ground-truth weight: DER has none

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._gens: dict[str, torch.Generator] = {}
        self._trainable: frozenset[str] = frozenset()
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: tuple | None = None   # (batch, drawn slots, size of the first draw, rows)

    # ------------------------------------------------------------------ per step
    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        # One generator per random choice (the reservoir's offers use step.seed), so adding DER++'s
        # draw never shifts DER's.
        super().before_step(step, data)
        self._gens = {k: torch.Generator().manual_seed((step.seed + i) % (1 << 63))
                      for i, k in ((1, "replay"), (2, "gt"))}
        self._cache_frozen(set(step.modalities))

    @torch.no_grad()
    def _cache_frozen(self, trainable: set[str]) -> None:
        """Outputs of every stored side whose learner is outside ``trainable`` (fixed this step).

        Records inserted during the step belong to the current pair, so a slot whose side is
        frozen still holds the record it held here, and its cached output stays valid.
        """
        self._trainable = frozenset(trainable)
        cap, d = self.buffer.capacity, self.learners.dim
        device = next(self.learners.parameters()).device
        self._frozen = (torch.zeros(cap, d, device=device), torch.zeros(cap, d, device=device))
        feats = self.buffer.features()
        if feats is None:
            return
        for names, x, cache in ((feats.ma, feats.xa, self._frozen[0]), (feats.mb, feats.xb, self._frozen[1])):
            for m in np.unique(names):
                if str(m) not in self._trainable:
                    idx = torch.as_tensor(np.flatnonzero(names == m), device=x.device)
                    cache[idx] = self.learners[str(m)](x[idx])

    def _replay_inputs(self, idx: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                         dict[str, torch.Tensor]]:
        """For each trainable learner with drawn rows: where they sit among the drawn records (side a,
        side b) and their inputs, side a's first."""
        feats = self.buffer.features()
        dev_idx = idx.to(feats.xa.device)
        ma, mb = feats.ma[idx.numpy()], feats.mb[idx.numpy()]
        rows, inputs = {}, {}
        for m in sorted(self._trainable):
            ra = torch.as_tensor(np.flatnonzero(ma == m), device=dev_idx.device)
            rb = torch.as_tensor(np.flatnonzero(mb == m), device=dev_idx.device)
            if len(ra) or len(rb):
                rows[m] = (ra, rb)
                inputs[m] = torch.cat([feats.xa[dev_idx[ra]], feats.xb[dev_idx[rb]]])
        return rows, inputs

    def _scores(self, idx: torch.Tensor, rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores of the drawn records from the trainable learners' ``outputs`` (as
        :meth:`_replay_inputs` ordered them) and the cached outputs of the frozen sides."""
        dev_idx = idx.to(self._frozen[0].device)
        sides: list[torch.Tensor | None] = [None, None]
        for m, (ra, rb) in rows.items():
            y = outputs[m]
            for side, r, part in ((0, ra, y[:len(ra)]), (1, rb, y[len(ra):])):
                if len(r) == len(idx):              # every drawn row of this side: no scatter needed
                    sides[side] = part
                elif len(r):
                    base = self._frozen[side][dev_idx] if sides[side] is None else sides[side]
                    sides[side] = base.index_put((r,), part)
        u, v = (self._frozen[i][dev_idx] if sides[i] is None else sides[i] for i in (0, 1))
        return pair_scores(PairOutput(u, v), self.objective.temperature)

    def replay_scores(self, idx: torch.Tensor) -> torch.Tensor:
        """Current scores of stored records ``idx``; only the current pair's learners get gradients.

        Each trainable learner runs once over all its drawn rows, both sides together.
        """
        rows, inputs = self._replay_inputs(idx)
        return self._scores(idx, rows, {m: self.learners[m](x) for m, x in inputs.items()})

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        """``replay_batch`` slots uniformly without replacement (as ``ReplayBuffer.sample``)."""
        return torch.randperm(len(self.buffer), generator=generator)[:self.replay_batch]

    def extra_inputs(self, batch: PairedFeatures) -> dict[str, torch.Tensor]:
        """This update's draws (DER++'s second one appended), whose trainable sides the trainer
        forwards with the batch."""
        self._pending = None
        if self.buffer.is_empty:
            return {}
        if self._frozen is None:
            self._cache_frozen(set(batch.ma.tolist()) | set(batch.mb.tolist()))
        idx = self._draw(self._gens["replay"])
        n = len(idx)
        if self.beta > 0:
            idx = torch.cat([idx, self._draw(self._gens["gt"])])   # second, independent draw
        rows, inputs = self._replay_inputs(idx)
        self._pending = (batch, idx, n, rows)
        return inputs

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        losses = super().losses(batch, out)
        if self.buffer.is_empty:
            losses["der_loss"] = out.u.new_zeros(())
            if self.beta > 0:
                losses["gt_loss"] = out.u.new_zeros(())
            return losses
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not batch or not set(pending[3]) <= set(out.extra):
            # called outside the trainer's closure: draw, and forward the replayed rows here
            inputs = self.extra_inputs(batch)
            pending, self._pending = self._pending, None
            out = replace(out, extra={m: self.learners[m](x) for m, x in inputs.items()})
        _, idx, n, rows = pending
        scores = self._scores(idx, rows, out.extra)
        if self.beta > 0:
            losses["gt_loss"] = self.beta * F.softplus(-scores[n:]).mean()
        stored = self.buffer.extras["score"][idx[:n].to(scores.device)]
        losses["der_loss"] = self.alpha * (scores[:n] - stored).pow(2).mean()
        return losses

    def record_extras(self, batch: PairedFeatures, out: PairOutput) -> dict[str, torch.Tensor]:
        # `out` is the forward pass that produced this update's gradient: pre-update scores.
        return {"score": pair_scores(PairOutput(out.u.detach(), out.v.detach()), self.objective.temperature)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._frozen = None
