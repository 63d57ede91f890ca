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
from cmcl.evaluate.retrieval import distinct_index, paired_recall, zero_shot_accuracy
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


#: per side of a test split, ``(first, inverse)`` of its distinct input rows (fixed for a run)
Index = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def input_index(ts: TestSet) -> Index:
    """The distinct input rows of both sides of a test split."""
    return distinct_index(ts.xa)[:2], distinct_index(ts.xb)[:2]


def _score_one(embed: Embed, ts: TestSet, settings: EvalSettings, index: Index | None = None,
               outputs: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Rows of one test split, without ``trained_through``.

    Each distinct input row is embedded once (repeated captions get bytewise identical outputs),
    and the metrics work on the distinct outputs and the inverse map, without expanding them.
    ``outputs`` holds the split's outputs by modality: those present are used as they are, the
    others are computed and added.
    """
    step = ts.step
    a, b = step.modalities
    base = {"eval_step": step.index, "dataset": step.dataset, "pair": step.pair}
    (fa, ia), (fb, ib) = index or input_index(ts)
    outputs = {} if outputs is None else outputs

    def output(key: str, modality: str, x: np.ndarray) -> np.ndarray:
        if key not in outputs:
            outputs[key] = embed(modality, x)
        return outputs[key]

    ua, vb = (output(f"a:{a}", a, ts.xa[fa]), ia), (output(f"b:{b}", b, ts.xb[fb]), ib)
    rows = []
    if step.has_recall:
        rec = paired_recall(ua, vb, KS, protocol=settings.recall_protocol, pool_size=settings.pool_size,
                            pool_count=settings.pool_count, seed=settings.seed + step.index,
                            use_gpu=settings.use_gpu)
        rows += [base | {"direction": direction, "metric": f"R@{k}", "value": 100.0 * v}
                 for direction, values in rec.items() for k, v in values.items()]
    if step.has_acc and ts.class_emb is not None:
        query = ua if b == "text" else vb  # the non-text side
        acc = zero_shot_accuracy(query, output("classes:text", "text", ts.class_emb), ts.labels,
                                 use_gpu=settings.use_gpu)
        rows.append(base | {"direction": "zero-shot", "metric": "acc", "value": 100.0 * acc})
    # The paper's alignment score A (Definition 1): the inner product of each test pair's outputs,
    # averaged over the split (raw, not a percentage); Fig. 3a compares it across steps.
    align = float(np.einsum("ij,ij->i", ua[0][ia], vb[0][ib], dtype=np.float64).mean())
    rows.append(base | {"direction": "mean", "metric": "align", "value": align})
    return rows


def score(embed: Embed, test_sets: Sequence[TestSet], trained_through: int,
          settings: EvalSettings = EvalSettings()) -> list[dict]:
    """Score every test split once (no reuse); returns the long-format rows for ``trained_through``."""
    return [{"trained_through": trained_through} | r for ts in test_sets for r in _score_one(embed, ts, settings)]


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
        self._index: dict[int, Index] = {}
        # per split, its outputs by "<side>:<modality>", kept while that modality's map is unchanged
        self._outputs: dict[int, dict[str, np.ndarray]] = {}
        self.reused = 0
        self.computed = 0

    def __call__(self, embed: Embed, trained_through: int, changed: Collection[str] | None = None) -> list[dict]:
        rows: list[list[dict]] = []
        for i, ts in enumerate(self.test_sets):
            if self._last is not None and changed is not None and not (scored_modalities(ts) & set(changed)):
                rows.append(self._last[i])
                self.reused += 1
            else:
                if i not in self._index:
                    self._index[i] = input_index(ts)
                kept = self._outputs.get(i, {}) if self._last is not None and changed is not None else {}
                kept = {k: v for k, v in kept.items() if k.split(":", 1)[1] not in set(changed or ())}
                rows.append(_score_one(embed, ts, self.settings, self._index[i], kept))
                self._outputs[i] = kept
                self.computed += 1
        self._last = rows
        return [{"trained_through": trained_through} | r for split_rows in rows for r in split_rows]
