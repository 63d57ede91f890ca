"""The replay buffer shared by rehearsal strategies (baselines.md §1, "Buffer record").

A record is a pair ``(x_a, x_b)`` with its modality names, the step it came from, its label and
optional per-method extras (DER's stored scores). Two filling policies:

* **reservoir** (:meth:`ReplayBuffer.add_reservoir`, DER/DER++): every training batch is offered,
  every epoch; after ``n`` offers a new pair takes slot ``n`` while the buffer is not full, else a
  uniform ``r`` in ``[0, n]`` replaces slot ``r`` when ``r < capacity``.
* **step-balanced** (:meth:`ReplayBuffer.fill_balanced`, GEM/Co2L/C-Flat/CILA): at the end of step
  t every step seen keeps ``capacity // t`` pairs, old shares sub-sampled uniformly and the current
  share drawn uniformly from the step's data. During step t the buffer holds steps < t only.

Randomness comes from a ``torch.Generator`` seeded from ``StepInfo.seed``, so resumed runs replay
the same choices. :class:`Replay` is the bookkeeping every rehearsal strategy shares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.strategies.base import Strategy, param
from cmcl.types import StepInfo


class ReplayBuffer:
    """Fixed-capacity store of paired embeddings (one policy per buffer).

    Args:
        capacity: M, the number of pairs.
        extras: names of per-record tensors a method stores (e.g. ``{"score": ()}`` for DER), with
            their trailing shapes.
    """

    def __init__(self, capacity: int, extras: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.capacity = int(capacity)
        self.extra_shapes = dict(extras or {})
        self._store: PairedFeatures | None = None   # preallocated rows; the first `size` are valid
        self._extras: dict[str, torch.Tensor] = {}
        self.size = 0
        self.offers = 0

    def __len__(self) -> int:
        return self.size

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    def features(self) -> PairedFeatures | None:
        """Every stored pair (``None`` when empty)."""
        return None if self.is_empty else self._store.select(slice(0, self.size))

    @property
    def extras(self) -> dict[str, torch.Tensor]:
        """Stored extras, row-aligned with :meth:`features`."""
        return {k: v[:self.size] for k, v in self._extras.items()}

    def composition(self) -> dict[int, int]:
        """Stored pairs per step (diagnostic logged by strategies)."""
        if self.is_empty:
            return {}
        steps, counts = np.unique(self._store.step[:self.size].cpu().numpy(), return_counts=True)
        return {int(s): int(c) for s, c in zip(steps, counts)}

    def _allocate(self, like: PairedFeatures) -> None:
        m, d, dev = self.capacity, like.dim, like.xa.device
        self._store = PairedFeatures(
            xa=torch.zeros(m, d, device=dev), xb=torch.zeros(m, d, device=dev),
            ma=np.full(m, "", dtype="<U32"), mb=np.full(m, "", dtype="<U32"),
            step=torch.zeros(m, dtype=torch.int64, device=dev), labels=torch.full((m,), -1, device=dev),
            ids=np.full(m, "", dtype=object))
        self._extras = {k: torch.zeros(m, *shape, device=dev) for k, shape in self.extra_shapes.items()}

    def _put(self, slots: np.ndarray, batch: PairedFeatures, rows: np.ndarray,
             extras: Mapping[str, torch.Tensor]) -> None:
        """Write ``batch``'s rows ``rows`` into slots ``slots`` (distinct), all fields at once."""
        st = self._store
        at, take = torch.as_tensor(slots, device=st.xa.device), torch.as_tensor(rows, device=batch.xa.device)
        for name in ("xa", "xb", "step", "labels"):
            getattr(st, name)[at] = getattr(batch, name)[take].to(st.xa.device)
        for name in ("ma", "mb", "ids"):
            getattr(st, name)[slots] = getattr(batch, name)[rows]
        for k, v in extras.items():
            self._extras[k][at] = v[take].to(st.xa.device)

    def add_reservoir(self, batch: PairedFeatures, generator: torch.Generator,
                      extras: Mapping[str, torch.Tensor] | None = None) -> None:
        """Offer every pair of ``batch`` (reservoir sampling); ``extras`` are stored alongside."""
        extras = {k: v.detach() for k, v in (extras or {}).items()}
        if set(extras) != set(self.extra_shapes):
            raise ValueError(f"buffer expects extras {sorted(self.extra_shapes)}, got {sorted(extras)}")
        for k, v in extras.items():
            if tuple(v.shape) != (len(batch), *self.extra_shapes[k]):
                raise ValueError(f"extra {k!r} has shape {tuple(v.shape)}, expected "
                                 f"{(len(batch), *self.extra_shapes[k])}")
        if self._store is None:
            self._allocate(batch)
        slots = np.full(len(batch), -1)          # where each offer goes (-1: not kept)
        for row in range(len(batch)):
            if self.size < self.capacity:
                slots[row] = self.size
                self.size += 1
            else:
                r = int(torch.randint(0, self.offers + 1, (1,), generator=generator))
                if r < self.capacity:
                    slots[row] = r
            self.offers += 1
        # A slot offered twice in one batch keeps the later row, as offering them one by one would.
        last = len(batch) - 1 - np.unique(slots[::-1], return_index=True)[1]
        last = last[slots[last] >= 0]
        self._put(slots[last], batch, last, extras)

    def fill_balanced(self, data: PairedFeatures, step_index: int, generator: torch.Generator) -> None:
        """Step-balanced refill after step ``step_index``: each step seen keeps ``capacity // t`` pairs."""
        if self.extra_shapes:
            raise ValueError("fill_balanced stores pairs only; use a buffer without extras")
        seen = sorted(set(self.composition()) | {int(step_index)})
        share = max(1, self.capacity // len(seen))
        stored = self.features()
        parts = []
        for s in seen:
            pool = data if s == step_index else stored.select(torch.nonzero(stored.step == s).flatten().cpu())
            pick = torch.randperm(len(pool), generator=generator)[:min(share, len(pool))]
            parts.append(pool.select(pick))
        merged = PairedFeatures.concat(parts)
        self._allocate(merged)
        self.size = len(merged)
        self._store = PairedFeatures.concat([merged, self._store.select(slice(self.size, self.capacity))]) \
            if self.size < self.capacity else merged

    def sample(self, n: int, generator: torch.Generator) -> tuple[PairedFeatures, dict[str, torch.Tensor]]:
        """``n`` stored records drawn uniformly without replacement (fewer when the buffer is smaller)."""
        if self.is_empty:
            raise ValueError("cannot sample from an empty buffer")
        pick = torch.randperm(self.size, generator=generator)[:n]
        return self._store.select(pick), {k: v[pick.to(v.device)] for k, v in self._extras.items()}

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (tensors, lists and ints only)."""
        state: dict[str, Any] = {"offers": self.offers, "size": self.size}
        if self._store is not None:
            st = self._store
            state |= {"xa": st.xa.cpu(), "xb": st.xb.cpu(), "ma": st.ma.tolist(), "mb": st.mb.tolist(),
                      "step": st.step.cpu(), "labels": st.labels.cpu(), "ids": [str(i) for i in st.ids],
                      "extras": {k: v.cpu() for k, v in self._extras.items()}}
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore :meth:`state_dict`."""
        self.offers, self.size = int(state["offers"]), int(state["size"])
        if "xa" not in state:
            self._store, self._extras = None, {}
            return
        self._store = PairedFeatures(
            xa=state["xa"].to(device), xb=state["xb"].to(device), ma=np.asarray(state["ma"], dtype="<U32"),
            mb=np.asarray(state["mb"], dtype="<U32"), step=state["step"].to(device),
            labels=state["labels"].to(device), ids=np.asarray(state["ids"], dtype=object))
        self._extras = {k: v.to(device) for k, v in state["extras"].items()}


def own_rows(step: StepInfo, data: PairedFeatures) -> PairedFeatures:
    """``data`` with every row tagged as step ``step.index`` (what the buffer and Co2L's anchors key on)."""
    if bool((data.step == step.index).all()):
        return data
    return replace(data, step=torch.full_like(data.step, step.index))


class Replay(Strategy):
    """Rehearsal bookkeeping shared by DER, GEM and Co2L (with C-Flat and CILA): the buffer of
    ``buffer_size`` pairs, its checkpoint state and report, and its filling. With ``reservoir`` every
    batch is offered after its update (with its :meth:`record_extras`); otherwise the buffer is refilled
    step-balanced after each step. Fills draw from one generator seeded with the step's seed.
    """

    @dataclass(frozen=True)
    class Params(Strategy.Params):
        buffer_size: int = param(256, ge=1)     # M, the pairs the buffer holds

    reservoir: ClassVar[bool] = False
    #: per-record tensors stored with each pair (name -> trailing shape); reservoir only
    buffer_extras: ClassVar[Mapping[str, tuple[int, ...]]] = {}
    #: report key of step s's stored pairs, and whether the size (and offers) are reported too
    step_key: ClassVar[str] = "buffer/step_{s}"
    report_totals: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.buffer = ReplayBuffer(self.buffer_size, self.buffer_extras)
        self._fill: torch.Generator | None = None

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._fill = torch.Generator().manual_seed(step.seed)

    def record_extras(self, batch: PairedFeatures, out: PairOutput) -> dict[str, torch.Tensor]:
        """The ``extras`` of the batch's pairs, from the forward pass of the update just made."""
        return {}

    def after_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        if self.reservoir:
            self.buffer.add_reservoir(batch, self._fill, self.record_extras(batch, out))

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        if not self.reservoir:
            self.buffer.fill_balanced(own_rows(step, data), step.index, self._fill)

    def report(self) -> dict[str, float]:
        """Stored pairs per protocol step; the size (and, reservoir, the pairs offered so far)."""
        out = {self.step_key.format(name=self.name, s=s): float(c)
               for s, c in sorted(self.buffer.composition().items())}
        if self.report_totals:
            out["buffer/size"] = float(len(self.buffer))
            if self.reservoir:
                out["buffer/offers"] = float(self.buffer.offers)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"], device=next(self.learners.parameters()).device)
