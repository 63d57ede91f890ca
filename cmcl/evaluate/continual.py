"""Continual-learning summaries of a result matrix (pure functions).

``R`` has shape (T + 1, T): ``R[i, j]`` is a metric on step j's test split (0-based column j is
protocol step j + 1) after training step i (row 0: before any training). Columns where the metric
does not apply are NaN.
"""

from __future__ import annotations

import numpy as np


def applicable(R: np.ndarray) -> np.ndarray:
    """Boolean mask of the columns where the metric applies."""
    return ~np.isnan(R).all(axis=0)


def final_average(R: np.ndarray) -> float:
    """Mean of the last row over applicable steps (the paper's reported score)."""
    cols = applicable(R)
    return float(np.mean(R[-1, cols])) if cols.any() else float("nan")


def backward_transfer(R: np.ndarray) -> float:
    """BWT (paper Eq. 14): mean over applicable steps j < T of ``R[T, j] - R[j, j]``.

    The paper normalises by T - 1 with every step applicable; with some steps not scored by a
    metric (accuracy is scored on 4 of the 11 steps) the mean runs over the applicable ones.
    """
    T = R.shape[1]
    cols = [j for j in np.flatnonzero(applicable(R)) if j < T - 1]
    if not cols:
        return float("nan")
    return float(np.mean([R[T, j] - R[j + 1, j] for j in cols]))


def forgetting(R: np.ndarray) -> float:
    """Average forgetting: mean over applicable j < T of ``max_{i<T} R[i, j] - R[T, j]`` (i >= j+1)."""
    T = R.shape[1]
    cols = [j for j in np.flatnonzero(applicable(R)) if j < T - 1]
    if not cols:
        return float("nan")
    return float(np.mean([np.nanmax(R[j + 1:T, j]) - R[T, j] for j in cols]))
