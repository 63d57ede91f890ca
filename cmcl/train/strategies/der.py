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
and stays bit-identical, and each update runs one matmul per trainable learner over all drawn
rows. A stored pair that shares no learner with the current pair adds a constant to the mean.

Each draw has its own generator (all seeded from ``StepInfo.seed``), so DER++ with ``beta = 0``
performs exactly DER's updates.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class _JointLinear(torch.autograd.Function):
    """One affine learner over the current rows (outputs already known) and new rows.

    The forward pass computes only the new rows; the backward pass forms the weight gradient of
    all rows with one matmul, instead of one per forward pass plus a gradient accumulation.
    """

    @staticmethod
    def forward(ctx, weight, bias, known_out, x_known, x_new):  # noqa: D102
        ctx.save_for_backward(torch.cat([x_known, x_new]))
        return torch.cat([known_out, torch.addmm(bias, x_new, weight.T)])

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (x,) = ctx.saved_tensors
        return grad.T @ x, grad.sum(0), None, None, None


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

    def replay_scores(self, idx: torch.Tensor) -> torch.Tensor:
        """Current scores of stored records ``idx``; only the current pair's learners get gradients.

        Each trainable learner runs once over all its drawn rows, both sides together.
        """
        feats = self.buffer.features()
        dev_idx = idx.to(feats.xa.device)
        xa, xb = feats.xa[dev_idx], feats.xb[dev_idx]
        ma, mb = feats.ma[idx.numpy()], feats.mb[idx.numpy()]
        u, v = self._frozen[0][dev_idx], self._frozen[1][dev_idx]
        for m in sorted(self._trainable):
            ra = torch.as_tensor(np.flatnonzero(ma == m), device=xa.device)
            rb = torch.as_tensor(np.flatnonzero(mb == m), device=xa.device)
            if not len(ra) and not len(rb):
                continue
            y = self.learners[m](torch.cat([xa[ra], xb[rb]]))
            if len(ra):
                u = u.index_put((ra,), y[:len(ra)])
            if len(rb):
                v = v.index_put((rb,), y[len(ra):])
        return pair_scores(PairOutput(u, v), self.objective.temperature)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        """``replay_batch`` slots uniformly without replacement (as ``ReplayBuffer.sample``)."""
        return torch.randperm(len(self.buffer), generator=generator)[:self.replay_batch]

    def _joint_scores(self, batch: PairedFeatures, out: PairOutput, idx: torch.Tensor):
        """Current outputs and replay scores with one weight-gradient matmul per trainable learner.

        The current rows reuse the values of ``out`` (the trainer's forward pass); the returned
        current outputs carry the gradient path instead of ``out``.
        """
        a, b = batch.single_pair
        feats = self.buffer.features()
        dev_idx = idx.to(feats.xa.device)
        xa, xb = feats.xa[dev_idx], feats.xb[dev_idx]
        ma, mb = feats.ma[idx.numpy()], feats.mb[idx.numpy()]
        u, v = self._frozen[0][dev_idx], self._frozen[1][dev_idx]
        current = {}
        for m, known, x_known in ((a, out.u, batch.xa), (b, out.v, batch.xb)):
            ra = torch.as_tensor(np.flatnonzero(ma == m), device=xa.device)
            rb = torch.as_tensor(np.flatnonzero(mb == m), device=xa.device)
            layer = self.learners[m]
            y = _JointLinear.apply(layer.weight, layer.bias, known.detach(), x_known, torch.cat([xa[ra], xb[rb]]))
            n = len(x_known)
            current[m] = y[:n]
            if len(ra):
                u = u.index_put((ra,), y[n:n + len(ra)])
            if len(rb):
                v = v.index_put((rb,), y[n + len(ra):])
        return PairOutput(current[a], current[b]), pair_scores(PairOutput(u, v), self.objective.temperature)

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        if self.buffer.is_empty:
            losses = super().losses(batch, out)
            losses["der_loss"] = out.u.new_zeros(())
            if self.beta > 0:
                losses["gt_loss"] = out.u.new_zeros(())
            return losses
        if self._frozen is None:
            self._cache_frozen(set(batch.ma.tolist()) | set(batch.mb.tolist()))
        idx = self._draw(self._gens["replay"])
        n = len(idx)
        if self.beta > 0:
            # Second, independent draw; both scored in the same pass.
            idx = torch.cat([idx, self._draw(self._gens["gt"])])
        pair = batch.single_pair
        if pair is not None and pair[0] != pair[1] and set(pair) == self._trainable and out.u.requires_grad:
            out, scores = self._joint_scores(batch, out, idx)
        else:
            scores = self.replay_scores(idx)
        losses = super().losses(batch, out)
        s_replay = scores[:n]
        if self.beta > 0:
            losses["gt_loss"] = self.beta * F.softplus(-scores[n:]).mean()
        stored = self.buffer.extras["score"][idx[:n].to(s_replay.device)]
        losses["der_loss"] = self.alpha * (s_replay - stored).pow(2).mean()
        return losses

    def record_extras(self, batch: PairedFeatures, out: PairOutput) -> dict[str, torch.Tensor]:
        # `out` is the forward pass that produced this update's gradient: pre-update scores.
        return {"score": pair_scores(PairOutput(out.u.detach(), out.v.detach()), self.objective.temperature)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._frozen = None
