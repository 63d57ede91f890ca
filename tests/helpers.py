"""Small builders shared by the strategy tests."""

from __future__ import annotations

import numpy as np

from cmcl.data.paired import PairedFeatures


def random_pairs(n: int, d: int, seed: int, pair: tuple[str, str], step: int = 0, *, coupling: float = 0.5,
                 labels: np.ndarray | None = None) -> PairedFeatures:
    """Unit-norm pairs whose b side is a noisy linear map of the a side (so they can be aligned)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, d)) * coupling + rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return PairedFeatures.from_arrays(x.astype(np.float32), y.astype(np.float32), pair, step, labels=labels)
