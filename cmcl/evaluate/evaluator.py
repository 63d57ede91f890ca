"""Score learners on every step's test split: one row of the result matrices per call.

Rows are long-format records ``(trained_through, eval_step, dataset, pair, direction, metric,
value)`` with values in percent. Recall@{1,5,10} is reported for ``a2b``, ``b2a`` and their
``mean``; zero-shot accuracy (direction ``zero-shot``) matches the non-text side to the class-name
prototypes, both through their learners.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cmcl.data.paired import TestSet
from cmcl.evaluate.retrieval import paired_recall, zero_shot_accuracy
from cmcl.train.learners import ModalityLearners

KS = (1, 5, 10)
RECALL_PROTOCOLS = ("paper", "full")


@dataclass(frozen=True)
class EvalSettings:
    """How recall is sampled.

    Attributes:
        recall_protocol: ``"paper"`` (mean over seeded pools) or ``"full"`` (whole test set).
        pool_size, pool_count: the paper's 1000 pairs x 5 pools.
        seed: pool seed; the same for every run so strategies are scored on the same pools.
    """

    recall_protocol: str = "paper"
    pool_size: int = 1000
    pool_count: int = 5
    seed: int = 0


def _outputs(learners: ModalityLearners, modality: str, x: np.ndarray, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        return learners(modality, torch.as_tensor(x, device=device)).float().cpu().numpy()


def evaluate(learners: ModalityLearners, test_sets: Sequence[TestSet], trained_through: int,
             settings: EvalSettings = EvalSettings()) -> list[dict]:
    """Evaluate every test set; returns the long-format rows for ``trained_through``."""
    device = next(learners.parameters()).device
    use_gpu = device.type == "cuda"
    rows: list[dict] = []
    for ts in test_sets:
        step = ts.step
        a, b = step.modalities
        base = {"trained_through": trained_through, "eval_step": step.index, "dataset": step.dataset,
                "pair": step.pair}
        ua = _outputs(learners, a, ts.xa, device)
        vb = _outputs(learners, b, ts.xb, device)
        if step.has_recall:
            rec = paired_recall(ua, vb, KS, protocol=settings.recall_protocol, pool_size=settings.pool_size,
                                pool_count=settings.pool_count, seed=settings.seed + step.index,
                                use_gpu=use_gpu)
            for direction, values in rec.items():
                for k, v in values.items():
                    rows.append(base | {"direction": direction, "metric": f"R@{k}", "value": 100.0 * v})
        if step.has_acc and ts.class_emb is not None:
            query = ua if b == "text" else vb  # the non-text side
            protos = _outputs(learners, "text", ts.class_emb, device)
            acc = zero_shot_accuracy(query, protos, ts.labels, use_gpu=use_gpu)
            rows.append(base | {"direction": "zero-shot", "metric": "acc", "value": 100.0 * acc})
    return rows
