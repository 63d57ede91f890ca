"""Retrieval metrics on arrays: FAISS exact inner-product search with exact tie handling.

Scores are raw dot products (as the authors). For query ``i`` with true partner ``t_i`` let
``g_i`` be the number of candidates scoring strictly higher than the partner and ``e_i`` the
number scoring exactly the same (the partner included). Under a uniformly random order among
tied candidates the partner is in the top ``k`` with probability ``clip((k - g_i) / e_i, 0, 1)``;
Recall@k is the mean of that over queries. This makes the metric independent of how a search
library happens to order ties (FAISS does not order them by index), which matters for datasets
whose texts repeat (one caption per class).
"""

from __future__ import annotations

import faiss
import numpy as np

_NEAR_TIE = 1e-5


def _has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RES = None


def knn(xq: np.ndarray, xb: np.ndarray, k: int, *, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product search: ``(D, I)`` of shape (nq, k), best first.

    Uses faiss-gpu when ``use_gpu`` and a GPU build of faiss with a visible GPU are present.
    """
    global _GPU_RES
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    k = min(k, xb.shape[0])
    if use_gpu and _has_gpu():
        if _GPU_RES is None:
            _GPU_RES = faiss.StandardGpuResources()
        return faiss.knn_gpu(_GPU_RES, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)


def _float32(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float32)``, without the copy when ``x`` already is C-contiguous float32 (the
    two give the same array, hence the same BLAS call and the same rounding)."""
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    return x.astype(np.float32)


#: Bytes of recount scores held at once (one row of ``len(xb)`` float32 scores per query).
_RECOUNT_BYTES = 32 << 20


def partner_ranks(xq: np.ndarray, xb: np.ndarray, targets: np.ndarray, k: int, *,
                  use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(g, e)`` per query: candidates scoring above the target, and tied with it (>= 1).

    ``g`` is exact when it is below ``k``; any ``g >= k`` means "not in the top k" and is reported
    as ``k``. Candidates are the rows of ``xb``; ``targets[i]`` is the row of query ``i``'s partner.

    Queries whose partner ties with the last of FAISS's ``k`` results, or is missing from them but
    scores within ``_NEAR_TIE`` of it, are recounted against every candidate. The inputs are
    converted to float32 once, and the recount's scores are written block by block into one
    buffer and counted a block at a time. Each query's scores are still one matrix-vector product
    ``xb @ xq[i]``: a matrix-matrix product rounds differently, and OpenBLAS's sgemm does not even
    give identical candidate rows identical scores, which would split exact ties.
    """
    nq = xq.shape[0]
    targets = np.asarray(targets, dtype=np.int64)
    # Query rows contiguous (a strided vector takes numpy's own loop, not BLAS); the candidates in
    # their own layout, as ``xb.astype(np.float32)`` gives them.
    xq32, xb32 = np.ascontiguousarray(xq, dtype=np.float32), _float32(xb)
    nb = xb32.shape[0]
    kk = min(k, nb)
    D, I = knn(xq32, xb32, kk, use_gpu=use_gpu)
    g = np.full(nq, k, dtype=np.int64)
    e = np.ones(nq, dtype=np.int64)
    hit = I == targets[:, None]
    found = hit.any(axis=1)
    last = D[:, -1]
    recount = np.zeros(nq, dtype=bool)
    rows = np.flatnonzero(found)
    if len(rows):
        s = D[rows, hit[rows].argmax(axis=1)]
        g[rows] = (D[rows] > s[:, None]).sum(axis=1)
        e[rows] = (D[rows] == s[:, None]).sum(axis=1)
        # A tie with the last retrieved score may continue beyond the k results: count exactly.
        recount[rows[(s == last[rows]) & (kk < nb)]] = True
    missing = np.flatnonzero(~found)
    if len(missing):
        s = np.einsum("ij,ij->i", xq32[missing], xb32[targets[missing]])
        scale = np.maximum(np.abs(last[missing]), 1.0)
        recount[missing[s >= last[missing] - _NEAR_TIE * scale]] = True
    todo = np.flatnonzero(recount)
    if len(todo):
        block = int(np.clip(_RECOUNT_BYTES // (4 * max(nb, 1)), 1, len(todo)))
        buf = np.empty((block, nb), dtype=np.float32)
        for lo in range(0, len(todo), block):
            qs = todo[lo:lo + block]
            scores = buf[:len(qs)]
            for j, i in enumerate(qs):
                np.matmul(xb32, xq32[i], out=scores[j])
            s = scores[np.arange(len(qs)), targets[qs]][:, None]
            g[qs] = np.minimum((scores > s).sum(axis=1), k)
            e[qs] = (scores == s).sum(axis=1)
    return g, e


def recall_from_ranks(g: np.ndarray, e: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    """Recall@k (fraction in [0, 1]) for each k from :func:`partner_ranks` output."""
    return {k: float(np.mean(np.clip((k - g) / e, 0.0, 1.0))) for k in ks}


def recall_at_k(xq: np.ndarray, xb: np.ndarray, ks: tuple[int, ...] = (1, 5, 10), *,
                targets: np.ndarray | None = None, use_gpu: bool = False) -> dict[int, float]:
    """Recall@k of queries ``xq`` against candidates ``xb``; partners are the diagonal by default."""
    if targets is None:
        if xq.shape[0] != xb.shape[0]:
            raise ValueError("diagonal targets need as many queries as candidates")
        targets = np.arange(xq.shape[0])
    g, e = partner_ranks(xq, xb, targets, max(ks), use_gpu=use_gpu)
    return recall_from_ranks(g, e, ks)


def pools(n: int, *, size: int = 1000, count: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Row subsets for the paper's protocol: ``count`` random pools of ``size`` rows, or all rows once
    when ``n <= size``."""
    if n <= size:
        return [np.arange(n)]
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(count)]


def paired_recall(ua: np.ndarray, vb: np.ndarray, ks: tuple[int, ...] = (1, 5, 10), *,
                  protocol: str = "paper", pool_size: int = 1000, pool_count: int = 5, seed: int = 0,
                  use_gpu: bool = False) -> dict[str, dict[int, float]]:
    """Recall@k of paired outputs in both directions (``a2b``, ``b2a``) and their ``mean``.

    Args:
        ua, vb: (N, D) outputs; row i of ``ua`` is paired with row i of ``vb``.
        protocol: ``"paper"`` (mean over ``pool_count`` seeded pools of ``pool_size`` pairs; the
            whole set when smaller) or ``"full"`` (the whole test set once).
    """
    if protocol == "full":
        chosen = [np.arange(len(ua))]
    elif protocol == "paper":
        chosen = pools(len(ua), size=pool_size, count=pool_count, seed=seed)
    else:
        raise ValueError(f"unknown recall protocol {protocol!r}; expected 'paper' or 'full'")
    acc = {"a2b": {k: 0.0 for k in ks}, "b2a": {k: 0.0 for k in ks}}
    for rows in chosen:
        qa, qb = ua[rows], vb[rows]
        for direction, (xq, xb) in (("a2b", (qa, qb)), ("b2a", (qb, qa))):
            for k, r in recall_at_k(xq, xb, ks, use_gpu=use_gpu).items():
                acc[direction][k] += r / len(chosen)
    acc["mean"] = {k: 0.5 * (acc["a2b"][k] + acc["b2a"][k]) for k in ks}
    return acc


def zero_shot_accuracy(xq: np.ndarray, prototypes: np.ndarray, labels: np.ndarray, *,
                       use_gpu: bool = False) -> float:
    """Top-1 accuracy of ``argmax_c <xq_i, prototypes_c>`` against ``labels`` (ties shared evenly)."""
    g, e = partner_ranks(xq, prototypes, labels, 1, use_gpu=use_gpu)
    return recall_from_ranks(g, e, (1,))[1]
