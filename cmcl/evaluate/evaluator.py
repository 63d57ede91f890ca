"""Score an embedding map on every step's test split: one row of the result matrices per call.

Rows are long-format records ``(trained_through, eval_step, dataset, pair, direction, metric,
value)`` with values in percent. Recall@{1,5,10} is reported for ``a2b``, ``b2a`` and their
``mean``; zero-shot accuracy (direction ``zero-shot``) matches the non-text side to the class-name
prototypes, both through the same map; ``align`` is the mean inner product of the paired outputs
(the paper's alignment score, for the stability figure).

The scorer knows nothing of training: it is given ``embed(modality, x) -> outputs`` (the learners,
wrapped by the application) and, optionally, which modalities changed since its last call. A test
split none of whose scored modalities changed has the same outputs and therefore the same metrics,
so its rows are reused exactly instead of recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from cmcl.data.paired import TestSet
from cmcl.evaluate.retrieval import Distinct, distinct_index, is_identity, paired_recall, zero_shot_accuracy
from cmcl.types import RECALL_PROTOCOLS

KS = (1, 5, 10)

#: ``embed(modality, x)``: (N, D) float32 inputs to (N, D) float32 outputs of that modality's map.
Embed = Callable[[str, np.ndarray], np.ndarray]

__all__ = ["KS", "RECALL_PROTOCOLS", "Embed", "EvalSettings", "Scorer", "score", "scored_modalities"]


@dataclass(frozen=True)
class EvalSettings:
    """How recall is sampled.

    Attributes:
        recall_protocol: ``"paper"`` (mean over seeded pools) or ``"full"`` (whole test set).
        pool_size, pool_count: the paper's 1000 pairs x 5 pools.
        seed: pool seed; the same for every run so strategies are scored on the same pools.
        use_gpu: search with faiss on the GPU (when faiss-gpu is installed).
    """

    recall_protocol: str = "paper"
    pool_size: int = 1000
    pool_count: int = 5
    seed: int = 0
    use_gpu: bool = False


def scored_modalities(ts: TestSet) -> frozenset[str]:
    """The modalities whose outputs a test split's metrics depend on."""
    a, b = ts.step.modalities
    return frozenset({a, b} | ({"text"} if ts.step.has_acc and ts.class_emb is not None else set()))


class _Outputs:
    """Each input array's distinct rows, and their outputs under each modality's current map.

    The test splits of one dataset share its arrays (every step of a dataset gets the same array
    of a modality), so an array's distinct rows are found once per run and its outputs are computed
    once per map, however many splits score them. Entries are keyed by the array's identity (and
    hold it, so the key stays unique); :meth:`forget` drops the outputs of maps that changed.
    """

    def __init__(self) -> None:
        self._index: dict[int, tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}
        self._outputs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, embed: Embed, modality: str, x: np.ndarray) -> Distinct:
        """The outputs of ``x`` under ``modality``'s map, as its distinct rows' outputs and the inverse
        map (each distinct row is embedded once: repeated captions get bytewise identical outputs)."""
        if self._index.get(id(x), (None,))[0] is not x:
            self._index[id(x)] = x, distinct_index(x)[:2]
        first, inverse = self._index[id(x)][1]
        if self._outputs.get((id(x), modality), (None,))[0] is not x:
            self._outputs[id(x), modality] = x, embed(modality, x[first])
        return self._outputs[id(x), modality][1], inverse

    def forget(self, modalities: Collection[str] | None) -> None:
        """Drop the outputs of ``modalities`` (all outputs when ``None``); distinct rows are kept."""
        self._outputs = {k: v for k, v in self._outputs.items()
                         if modalities is not None and k[1] not in modalities}


def _score_one(embed: Embed, ts: TestSet, settings: EvalSettings, outputs: _Outputs) -> list[dict]:
    """Rows of one test split, without ``trained_through``; the metrics work on the distinct outputs
    and the inverse maps, without expanding them."""
    step = ts.step
    a, b = step.modalities
    base = {"eval_step": step.index, "dataset": step.dataset, "pair": step.pair}
    ua, vb = outputs(embed, a, ts.xa), outputs(embed, b, ts.xb)
    rows = []
    if step.has_recall:
        rec = paired_recall(ua, vb, KS, protocol=settings.recall_protocol, pool_size=settings.pool_size,
                            pool_count=settings.pool_count, seed=settings.seed + step.index,
                            use_gpu=settings.use_gpu)
        rows += [base | {"direction": direction, "metric": f"R@{k}", "value": 100.0 * v}
                 for direction, values in rec.items() for k, v in values.items()]
    if step.has_acc and ts.class_emb is not None:
        query = ua if b == "text" else vb  # the non-text side
        acc = zero_shot_accuracy(query, outputs(embed, "text", ts.class_emb), ts.labels,
                                 use_gpu=settings.use_gpu)
        rows.append(base | {"direction": "zero-shot", "metric": "acc", "value": 100.0 * acc})
    # The paper's alignment score A (Definition 1): the inner product of each test pair's outputs,
    # averaged over the split (raw, not a percentage); Fig. 3a compares it across steps.
    pa, pb = (u if is_identity(i) else u[i] for u, i in (ua, vb))
    align = float(np.einsum("ij,ij->i", pa, pb, dtype=np.float64).mean())
    rows.append(base | {"direction": "mean", "metric": "align", "value": align})
    return rows


def score(embed: Embed, test_sets: Sequence[TestSet], trained_through: int,
          settings: EvalSettings = EvalSettings()) -> list[dict]:
    """Score every test split once (nothing kept for later calls); returns the long-format rows for
    ``trained_through``."""
    outputs = _Outputs()
    return [{"trained_through": trained_through} | r for ts in test_sets
            for r in _score_one(embed, ts, settings, outputs)]


class Scorer:
    """Score a sequence of models on fixed test splits, reusing what did not change.

    Call it with ``changed=None`` (everything may have changed: the first call always is) or with
    the set of modalities whose map changed since the previous call; the rows of a split whose
    scored modalities are all unchanged are copied from the previous call. ``reused`` and
    ``computed`` count splits, for the record.
    """

    def __init__(self, test_sets: Sequence[TestSet], settings: EvalSettings = EvalSettings()) -> None:
        self.test_sets = list(test_sets)
        self.settings = settings
        self._last: list[list[dict]] | None = None
        self._outputs = _Outputs()   # kept while each modality's map is unchanged
        self.reused = 0
        self.computed = 0

    def __call__(self, embed: Embed, trained_through: int, changed: Collection[str] | None = None) -> list[dict]:
        if self._last is None:
            changed = None
        self._outputs.forget(changed)
        rows: list[list[dict]] = []
        for i, ts in enumerate(self.test_sets):
            if changed is not None and not (scored_modalities(ts) & set(changed)):
                rows.append(self._last[i])
                self.reused += 1
            else:
                rows.append(_score_one(embed, ts, self.settings, self._outputs))
                self.computed += 1
        self._last = rows
        return [{"trained_through": trained_through} | r for split_rows in rows for r in split_rows]
