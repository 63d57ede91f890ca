"""The contrastive objective: CLIP InfoNCE over a batch of pairs (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_DIRECTIONS = ("a2b", "symmetric")


def info_nce(u: torch.Tensor, v: torch.Tensor, *, temperature: float = 1.0,
             direction: str = "a2b") -> torch.Tensor:
    """InfoNCE with in-batch negatives on raw (unnormalised) dot products.

    ``logits = u @ v.T / temperature`` and the target of row ``i`` is column ``i``.

    Args:
        u, v: (n, d) outputs of the anchor (a) and other (b) learners.
        temperature: tau; the paper and the authors' code use 1.
        direction: ``"a2b"`` (the authors' default: rows are modality a) or ``"symmetric"``
            (mean of both directions).
    """
    logits = u @ v.T
    if temperature != 1.0:
        logits = logits / temperature
    target = torch.arange(u.shape[0], device=u.device)
    loss = F.cross_entropy(logits, target)
    if direction == "a2b":
        return loss
    if direction == "symmetric":
        return 0.5 * (loss + F.cross_entropy(logits.T, target))
    raise ValueError(f"unknown loss direction {direction!r}; expected one of {LOSS_DIRECTIONS}")
