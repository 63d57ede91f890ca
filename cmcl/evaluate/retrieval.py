"""Retrieval metrics on arrays: exact inner-product scores with exact tie handling.

Scores are raw dot products (as the authors). For query ``i`` with true partner ``t_i`` let
``g_i`` be the number of candidates scoring strictly higher than the partner and ``e_i`` the
number scoring exactly the same (the partner included). Under a uniformly random order among
tied candidates the partner is in the top ``k`` with probability ``clip((k - g_i) / e_i, 0, 1)``;
Recall@k is the mean of that over queries. This makes the metric independent of how a search
library happens to order ties, which matters for datasets whose texts repeat (one caption per
class).

Identical candidate rows must tie *exactly*, and a matrix product does not guarantee it: BLAS's
sgemm (FAISS's exact search uses it) gives copies of one row different scores in the last bit
depending on where they sit. So every distinct row is scored once and counted with its
multiplicity: a pool's distinct rows of each side go through one product (FAISS's pairwise inner
products on the GPU, torch on the CPU), and both directions of a pool are counted from it.

On the CPU every product here goes through torch, not numpy: scoring alternates with the learners'
products, and two BLAS libraries in one process each keep a pool of threads that spin for a while
after a product, taking the cores from the other's next one. On two cores, a learner's product of
2,000 rows took 26 ms after a numpy product of a pool's scores and 12 ms after the same product in
torch (``benchmarks/bench_thread_pools.py``); a protocol run's scoring went from 4.8 s to 3.3 s.
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import torch


def _has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RES = None

#: Bytes of scores held at once (the product is computed a block of query rows at a time).
_BLOCK_BYTES = 64 << 20


def inner_products(xq: np.ndarray, xb: np.ndarray, *, use_gpu: bool = False) -> np.ndarray:
    """``xq @ xb.T`` in float32 (faiss-gpu when ``use_gpu`` and a GPU build with a GPU are present)."""
    global _GPU_RES
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if use_gpu and _has_gpu():
        if _GPU_RES is None:
            _GPU_RES = faiss.StandardGpuResources()
        return faiss.pairwise_distance_gpu(_GPU_RES, xq, xb, metric=faiss.METRIC_INNER_PRODUCT)
    return _matmul(xq, xb.T)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` through torch's BLAS, the one the learners use (no second thread pool; module notes)."""
    return torch.matmul(_tensor(a), _tensor(b)).numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """``a`` as a tensor sharing its memory; a read-only array too (it is only read here), without
    torch's warning about writing to it."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def distinct_index(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first, inverse, counts)`` of the distinct rows of ``x`` (bytewise as float32): the distinct
    rows are ``x[first]`` in order of first occurrence, ``x[i]`` is row ``inverse[i]`` of them, which
    occurs ``counts`` times. When every row is distinct, ``first`` and ``inverse`` are ``arange``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    keys = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.ravel()], counts[order]


def is_identity(index: np.ndarray) -> bool:
    """Whether ``index`` is ``arange(len(index))`` (a selection that selects everything, in order)."""
    return len(index) == 0 or (index[0] == 0 and index[-1] == len(index) - 1 and bool(np.all(np.diff(index) == 1)))


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, inverse, counts)``: the distinct rows of ``x`` as float32 (bytewise), ``x[i] ==
    rows[inverse[i]]`` and how often each occurs."""
    first, inverse, counts = distinct_index(x)
    return np.ascontiguousarray(x[first], dtype=np.float32), inverse, counts


#: ``(rows, inverse)``: an (N, D) array given as its distinct rows and ``inverse`` (N,), the array
#: being ``rows[inverse]``; what :func:`unique_rows` returns first, for callers that already know it.
Distinct = tuple[np.ndarray, np.ndarray]


def _distinct(x: np.ndarray | Distinct) -> Distinct:
    return x if isinstance(x, tuple) else unique_rows(x)[:2]


def _pool(x: Distinct, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(used, inverse, counts)`` of ``x[rows]``: the distinct rows it uses (indices into ``x[0]``,
    ascending), which of them each of its rows is, and how often each occurs (an integer
    ``np.unique``, no row comparison)."""
    used, inverse, counts = np.unique(x[1][rows], return_inverse=True, return_counts=True)
    return used, inverse.ravel(), counts


def _rows(x: Distinct, used: np.ndarray) -> np.ndarray:
    """``x[0][used]`` as contiguous float32 (``x[0]`` itself when ``used`` selects all of it)."""
    whole = len(used) == len(x[0]) and is_identity(used)
    return np.ascontiguousarray(x[0] if whole else x[0][used], dtype=np.float32)


def _subset(x: Distinct, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`unique_rows` of ``x[rows]``, from the known distinct rows of ``x``."""
    used, inverse, counts = _pool(x, rows)
    return _rows(x, used), inverse, counts


def _tally(flags: np.ndarray, counts: np.ndarray, axis: int) -> np.ndarray:
    """How many candidates ``flags`` marks along ``axis``, each distinct candidate ``counts`` times
    (int64). The sums are exact: bytes summed into an integer wide enough for the axis, or, with
    multiplicities, a BLAS product in a float that holds every partial sum exactly (whole numbers
    below 2^24 in float32, 2^53 in float64); both take about half the time of ``count_nonzero``
    and of an integer product."""
    if counts.max() == 1:
        wide = np.uint16 if flags.shape[axis] <= np.iinfo(np.uint16).max else np.int64
        return flags.view(np.uint8).sum(axis=axis, dtype=wide).astype(np.int64)
    real = np.float32 if counts.sum() < 2 ** 24 else np.float64
    weights, marks = counts.astype(real), flags.astype(real)
    return (_matmul(marks, weights) if axis == 1 else _matmul(weights, marks)).astype(np.int64)


def _count(scores: np.ndarray, partner: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g, e)`` of each row of ``scores`` (distinct candidates, weighted by ``counts``) against
    the column ``partner[i]`` of its row."""
    s = scores[np.arange(len(scores)), partner][:, None]
    return _tally(scores > s, counts, 1), _tally(scores == s, counts, 1)


def _count_both(scores: np.ndarray, ia: np.ndarray, ib: np.ndarray, ca: np.ndarray, cb: np.ndarray):
    """``((g, e) a→b, (g, e) b→a)`` of pairs ``i`` = (row ``ia[i]``, column ``ib[i]``) of one product
    of distinct rows: a→b compares each pair's score with its row, b→a with its column. Rows and
    columns are read in place when every pair's is distinct (no gather, no transposed copy)."""
    s = scores[ia, ib]
    rows = scores if is_identity(ia) and len(ia) == len(scores) else scores[ia]
    cols = scores if is_identity(ib) and len(ib) == scores.shape[1] else scores[:, ib]
    a2b = _tally(rows > s[:, None], cb, 1), _tally(rows == s[:, None], cb, 1)
    b2a = _tally(cols > s, ca, 0), _tally(cols == s, ca, 0)
    return a2b, b2a


def _ranks(uq: np.ndarray, query_row: np.ndarray, ub: np.ndarray, partner: np.ndarray, counts: np.ndarray,
           k: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(g, e)`` for queries ``uq[query_row[i]]`` with partner ``ub[partner[i]]``, candidates ``ub``
    with multiplicities ``counts``; the distinct query rows are scored a block at a time."""
    g = np.empty(len(query_row), dtype=np.int64)
    e = np.empty(len(query_row), dtype=np.int64)
    order = np.argsort(query_row, kind="stable")
    sorted_rows = query_row[order]
    block = max(1, _BLOCK_BYTES // (4 * max(len(ub), 1)))
    for lo in range(0, len(uq), block):
        qs = order[np.searchsorted(sorted_rows, lo):np.searchsorted(sorted_rows, lo + block)]
        scores = inner_products(uq[lo:lo + block], ub, use_gpu=use_gpu)
        g[qs], e[qs] = _count(scores[query_row[qs] - lo], partner[qs], counts)
    return np.minimum(g, k), e


def partner_ranks(xq: np.ndarray | Distinct, xb: np.ndarray | Distinct, targets: np.ndarray, k: int, *,
                  use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(g, e)`` per query: candidates scoring above the target, and tied with it (>= 1).

    ``g`` is exact when it is below ``k``; any ``g >= k`` means "not in the top k" and is reported
    as ``k``. Candidates are the rows of ``xb``; ``targets[i]`` is the row of query ``i``'s partner.
    Copies of a candidate row always tie (each distinct row is scored once). Either side may be
    given as :data:`Distinct` rows.
    """
    (uq, qi), xb = _distinct(xq), _distinct(xb)
    ub, bi, counts = _subset(xb, np.arange(len(xb[1])))
    return _ranks(np.ascontiguousarray(uq, dtype=np.float32), qi, ub, bi[np.asarray(targets, dtype=np.int64)],
                  counts, k, use_gpu)


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


def _shared_scores(ua: Distinct, vb: Distinct, parts: list, use_gpu: bool):
    """``((union_a, union_b), scores)``: one product over the distinct rows every pool uses, when
    that costs less than a product per pool (pools drawn from a split not much larger than a pool
    overlap heavily); each pool's scores are then a block of it. ``None`` otherwise."""
    if len(parts) < 2:
        return None
    union_a = np.unique(np.concatenate([pa[0] for pa, _ in parts]))
    union_b = np.unique(np.concatenate([pb[0] for _, pb in parts]))
    size = len(union_a) * len(union_b)
    if size >= sum(len(pa[0]) * len(pb[0]) for pa, pb in parts) or 4 * size > _BLOCK_BYTES:
        return None
    return (union_a, union_b), inner_products(_rows(ua, union_a), _rows(vb, union_b), use_gpu=use_gpu)


def paired_recall(ua: np.ndarray | Distinct, vb: np.ndarray | Distinct, ks: tuple[int, ...] = (1, 5, 10), *,
                  protocol: str = "paper", pool_size: int = 1000, pool_count: int = 5, seed: int = 0,
                  use_gpu: bool = False) -> dict[str, dict[int, float]]:
    """Recall@k of paired outputs in both directions (``a2b``, ``b2a``) and their ``mean``.

    Args:
        ua, vb: (N, D) outputs, or their :data:`Distinct` rows; row i of ``ua`` is paired with
            row i of ``vb``.
        protocol: ``"paper"`` (mean over ``pool_count`` seeded pools of ``pool_size`` pairs; the
            whole set when smaller) or ``"full"`` (the whole test set once).
    """
    ua, vb = _distinct(ua), _distinct(vb)
    n = len(ua[1])
    if protocol == "full":
        chosen = [np.arange(n)]
    elif protocol == "paper":
        chosen = pools(n, size=pool_size, count=pool_count, seed=seed)
    else:
        raise ValueError(f"unknown recall protocol {protocol!r}; expected 'paper' or 'full'")
    parts = [(_pool(ua, rows), _pool(vb, rows)) for rows in chosen]
    shared = _shared_scores(ua, vb, parts, use_gpu)
    acc = {"a2b": {k: 0.0 for k in ks}, "b2a": {k: 0.0 for k in ks}}
    for (used_a, ia, ca), (used_b, ib, cb) in parts:
        if shared is not None:
            (union_a, union_b), scores = shared
            scores = np.take(np.take(scores, np.searchsorted(union_a, used_a), axis=0),
                             np.searchsorted(union_b, used_b), axis=1)
            a2b, b2a = _count_both(scores, ia, ib, ca, cb)
        elif 4 * len(used_a) * len(used_b) <= _BLOCK_BYTES:   # one product serves both directions
            scores = inner_products(_rows(ua, used_a), _rows(vb, used_b), use_gpu=use_gpu)
            a2b, b2a = _count_both(scores, ia, ib, ca, cb)
        else:
            ua_u, vb_u = _rows(ua, used_a), _rows(vb, used_b)
            a2b = _ranks(ua_u, ia, vb_u, ib, cb, max(ks), use_gpu)
            b2a = _ranks(vb_u, ib, ua_u, ia, ca, max(ks), use_gpu)
        for direction, (g, e) in (("a2b", a2b), ("b2a", b2a)):
            for k, r in recall_from_ranks(g, e, ks).items():
                acc[direction][k] += r / len(chosen)
    acc["mean"] = {k: 0.5 * (acc["a2b"][k] + acc["b2a"][k]) for k in ks}
    return acc


def zero_shot_accuracy(xq: np.ndarray | Distinct, prototypes: np.ndarray | Distinct, labels: np.ndarray, *,
                       use_gpu: bool = False) -> float:
    """Top-1 accuracy of ``argmax_c <xq_i, prototypes_c>`` against ``labels`` (ties shared evenly)."""
    g, e = partner_ranks(xq, prototypes, labels, 1, use_gpu=use_gpu)
    return recall_from_ranks(g, e, (1,))[1]
