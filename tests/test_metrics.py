"""Evaluator metrics against brute-force numpy, ties included, and the continual summaries."""

from __future__ import annotations

import numpy as np
import pytest

from cmcl.evaluate.continual import backward_transfer, final_average, forgetting
from cmcl.evaluate.retrieval import paired_recall, partner_ranks, pools, recall_at_k, zero_shot_accuracy


def brute_recall(xq, xb, targets, ks):
    """Expected Recall@k under uniformly random tie-breaking, from the full score matrix."""
    S = xq.astype(np.float64) @ xb.astype(np.float64).T
    s = S[np.arange(len(xq)), targets][:, None]
    g = (S > s).sum(1)
    e = (S == s).sum(1)
    return {k: float(np.mean(np.clip((k - g) / e, 0, 1))) for k in ks}


@pytest.mark.parametrize("seed", range(4))
def test_recall_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Small integers: exact float arithmetic, and many exactly tied scores (repeated candidates).
    base = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    xb = np.repeat(base, 5, axis=0)[rng.permutation(200)]
    xq = rng.integers(-2, 3, size=(200, 6)).astype(np.float32)
    targets = rng.integers(0, 200, size=200)
    got = recall_at_k(xq, xb, (1, 5, 10), targets=targets)
    want = brute_recall(xq, xb, targets, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    assert 0 < want[10] < 1  # the case is not trivial


def test_recall_on_continuous_data_matches_brute_force():
    rng = np.random.default_rng(7)
    xa = rng.standard_normal((300, 16)).astype(np.float32)
    xb = xa + 0.8 * rng.standard_normal((300, 16)).astype(np.float32)
    got = recall_at_k(xa, xb)
    want = brute_recall(xa, xb, np.arange(300), (1, 5, 10))
    assert got == pytest.approx(want, abs=1e-9)
    g, e = partner_ranks(xa, xb, np.arange(300), 10)
    S = xa.astype(np.float64) @ xb.astype(np.float64).T
    above = (S > np.diag(S)[:, None]).sum(1)
    assert (e == 1).all()                                   # continuous data: no ties
    np.testing.assert_array_equal(g, np.minimum(above, 10))  # exact below k, reported as k beyond
    assert (above < 10).any() and (above > 10).any()        # both cases occur


def test_pools_and_protocols():
    assert len(pools(500, size=1000)) == 1 and len(pools(500, size=1000)[0]) == 500
    p = pools(3000, size=1000, count=5, seed=3)
    assert len(p) == 5 and all(len(set(x)) == 1000 for x in p)
    assert all((a == b).all() for a, b in zip(p, pools(3000, size=1000, count=5, seed=3)))
    rng = np.random.default_rng(0)
    u = rng.standard_normal((1500, 8)).astype(np.float32)
    v = u + rng.standard_normal((1500, 8)).astype(np.float32)
    full = paired_recall(u, v, protocol="full")
    assert full["a2b"][10] == pytest.approx(brute_recall(u, v, np.arange(1500), (10,))[10])
    assert full["b2a"][10] == pytest.approx(brute_recall(v, u, np.arange(1500), (10,))[10])
    assert full["mean"][5] == pytest.approx((full["a2b"][5] + full["b2a"][5]) / 2)
    paper = paired_recall(u, v, protocol="paper", seed=1)
    want = np.mean([brute_recall(u[r], v[r], np.arange(1000), (1,))[1] for r in pools(1500, seed=1)])
    assert paper["a2b"][1] == pytest.approx(want)
    assert paper["a2b"][10] > full["a2b"][10]  # smaller pools are easier


def test_zero_shot_accuracy_shares_ties_evenly():
    protos = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)  # classes 0 and 2 identical
    xq = np.array([[2, 0], [0, 3], [1, 0], [0.1, -1]], dtype=np.float32)
    labels = np.array([0, 1, 2, 1])
    # query 0: tie between 0 and 2, label 0 -> 1/2; query 1 -> 1; query 2: tie, label 2 -> 1/2;
    # query 3: best is class 0/2 (0.1) over class 1 (-1) -> 0.
    assert zero_shot_accuracy(xq, protos, labels) == pytest.approx((0.5 + 1 + 0.5 + 0) / 4)


def test_continual_summaries_by_hand():
    nan = np.nan
    R = np.array([[10, 20, nan, 30],
                  [50, 25, nan, 30],
                  [40, 60, nan, 35],
                  [45, 50, nan, 70],
                  [30, 55, nan, 80.0]])
    assert final_average(R) == pytest.approx((30 + 55 + 80) / 3)
    # BWT over applicable j < T: (R[4,0]-R[1,0]) and (R[4,1]-R[2,1]); step 3 is not applicable.
    assert backward_transfer(R) == pytest.approx(((30 - 50) + (55 - 60)) / 2)
    assert forgetting(R) == pytest.approx(((50 - 30) + (60 - 55)) / 2)
    assert np.isnan(backward_transfer(np.full((3, 2), nan)))
