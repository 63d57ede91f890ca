"""The contrastive objective: CLIP InfoNCE over a batch of pairs (pure functions)."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

LOSS_DIRECTIONS = ("a2b", "symmetric")
T = TypeVar("T")


def two_way(direction: str, a2b: Callable[[], T], b2a: Callable[[], T],
            combine: Callable[[T, T], T] = lambda f, b: 0.5 * (f + b)) -> T:
    """The loss ``direction`` asks for, from its one-way terms: ``a2b()`` alone (``"a2b"``), or
    ``combine(a2b(), b2a())`` (``"symmetric"``: their mean unless told otherwise)."""
    if direction not in LOSS_DIRECTIONS:
        raise ValueError(f"unknown loss direction {direction!r}; expected one of {LOSS_DIRECTIONS}")
    forward = a2b()
    return forward if direction == "a2b" else combine(forward, b2a())


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
    return two_way(direction, lambda: F.cross_entropy(logits, target), lambda: F.cross_entropy(logits.T, target))
