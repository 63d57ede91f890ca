"""``partner_ranks`` and ``paired_recall`` count exactly: copies of a row always tie, the counts
match a float64 brute force wherever float32 rounding cannot matter, and neither the order of the
candidates nor the block size changes a single count."""

from __future__ import annotations

import numpy as np
import pytest

from cmcl.data.catalog import DATASETS
from cmcl.evaluate import retrieval
from cmcl.evaluate.retrieval import paired_recall, partner_ranks, recall_from_ranks, zero_shot_accuracy
from cmcl.extract.synthetic import SyntheticConfig, SyntheticDataset, SyntheticSpace


def brute_ranks(xq, xb, targets, k):
    """float64 full score matrix; also the gap between the partner and the nearest other score."""
    S = xq.astype(np.float64) @ xb.astype(np.float64).T
    s = S[np.arange(len(xq)), targets][:, None]
    gap = np.where(S == s, np.inf, np.abs(S - s)).min(axis=1)
    return np.minimum((S > s).sum(1), k), (S == s).sum(1), gap


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


BLOCKS = (1, 7, None)   # query rows scored per block: one, seven, the default


def ranks_every_block(monkeypatch, xq, xb, targets, k):
    results = []
    for rows in BLOCKS:
        monkeypatch.setattr(retrieval, "_BLOCK_BYTES", 4 * xb.shape[0] * rows if rows else 64 << 20)
        results.append(partner_ranks(xq, xb, targets, k))
    return results


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 10])
def test_exact_integer_ties_equal_the_brute_force_in_every_block_size(seed, k, monkeypatch):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2, size=(30, 5)).astype(np.float32)    # few distinct rows and scores
    xb = np.repeat(base, 7, axis=0)[rng.permutation(210)]            # every candidate 7 times at least
    xq = rng.integers(-1, 2, size=(203, 5)).astype(np.float32)
    targets = rng.integers(0, 210, size=203)
    g0, e0, _ = brute_ranks(xq, xb, targets, k)
    for g, e in ranks_every_block(monkeypatch, xq, xb, targets, k):
        np.testing.assert_array_equal(g, g0)
        np.testing.assert_array_equal(e, e0)
    assert (e0[g0 < k] >= 7).all() and (g0 < k).any() and (g0 == k).any()


@pytest.mark.parametrize("n,d", [(400, 96), (1000, 1024)])
def test_copies_of_a_continuous_row_always_tie(n, d, monkeypatch):
    """Texts repeated per class: the partner ties with every copy of its text and nothing else. At
    d = 1,024 a blocked sgemm scores copies differently in the last bit (measured with FAISS's
    search: 11% of (query, copied row) pairs); scoring each distinct row once cannot."""
    rng = np.random.default_rng(n)
    classes = n // 8
    protos = unit_rows(rng, classes, d)
    labels = rng.integers(0, classes, size=n)
    texts = protos[labels]
    audio = texts + 0.8 * unit_rows(rng, n, d)
    targets = np.arange(n)
    copies = np.bincount(labels, minlength=classes)[labels]
    g0, _, gap = brute_ranks(audio, texts, targets, 10)
    clear = gap > 1e-4                                   # float32 rounding cannot reorder these
    assert clear.mean() > 0.9
    for g, e in ranks_every_block(monkeypatch, audio, texts, targets, 10):
        np.testing.assert_array_equal(e, copies)
        np.testing.assert_array_equal(g[clear], g0[clear])
    # Duplicated queries against distinct candidates: no ties, and copies of a query rank alike.
    g, e = partner_ranks(texts, audio, targets, 10)
    assert (e == 1).all()


def test_the_order_of_the_candidates_changes_no_count():
    rng = np.random.default_rng(3)
    protos = unit_rows(rng, 60, 256)
    labels = rng.integers(0, 60, size=500)
    xb = protos[labels]
    xq = xb + 0.6 * unit_rows(rng, 500, 256)
    targets = np.arange(500)
    g, e = partner_ranks(xq, xb, targets, 10)
    perm = rng.permutation(500)
    inv = np.argsort(perm)
    g2, e2 = partner_ranks(xq, xb[perm], inv[targets], 10)
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(e, e2)
    g3, e3 = partner_ranks(xq.astype(np.float64), np.asfortranarray(xb), targets, 10)
    np.testing.assert_array_equal(g, g3)
    np.testing.assert_array_equal(e, e3)


def test_paired_recall_from_one_product_equals_the_blocked_directions(monkeypatch):
    rng = np.random.default_rng(11)
    base = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    vb = base[rng.integers(0, 40, size=600)]                        # repeated texts
    ua = rng.integers(-2, 3, size=(600, 6)).astype(np.float32)
    one = paired_recall(ua, vb, protocol="full")
    monkeypatch.setattr(retrieval, "_BLOCK_BYTES", 4 * 600 * 3)        # too small: two blocked passes
    assert paired_recall(ua, vb, protocol="full") == one
    for direction, (xq, xb) in (("a2b", (ua, vb)), ("b2a", (vb, ua))):
        g, e, _ = brute_ranks(xq, xb, np.arange(600), 10)
        assert one[direction] == pytest.approx(recall_from_ranks(g, e, (1, 5, 10)), abs=1e-12)
    assert 0 < one["a2b"][1] < one["a2b"][10] < 1


@pytest.mark.parametrize("both_repeat", [False, True])
def test_pools_scored_from_one_product_of_their_union_equal_a_product_per_pool(both_repeat, monkeypatch):
    """Five pools of 100 pairs from 130 overlap; their union's product serves them all, and every
    count equals a product per pool and a float64 brute force, ties (repeated rows) included."""
    rng = np.random.default_rng(12)
    base = rng.integers(-2, 3, size=(25, 6)).astype(np.float32)
    vb = base[rng.integers(0, 25, size=130)]
    ua = (base[rng.integers(0, 40, size=130) % 25] + 1 if both_repeat
          else rng.integers(-2, 3, size=(130, 6)).astype(np.float32))
    calls = []
    real = retrieval.inner_products
    monkeypatch.setattr(retrieval, "inner_products", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    shared = paired_recall(ua, vb, protocol="paper", pool_size=100, pool_count=5, seed=3)
    assert len(calls) == 1                                             # the union, once
    monkeypatch.setattr(retrieval, "_shared_scores", lambda *a: None)
    assert paired_recall(ua, vb, protocol="paper", pool_size=100, pool_count=5, seed=3) == shared
    assert len(calls) == 1 + 5
    for direction, (xq, xb) in (("a2b", (ua, vb)), ("b2a", (vb, ua))):
        want = np.mean([recall_from_ranks(*brute_ranks(xq[r], xb[r], np.arange(100), 10)[:2], (1, 5, 10))[1]
                        for r in retrieval.pools(130, size=100, count=5, seed=3)])
        assert shared[direction][1] == pytest.approx(want, abs=1e-12)
    assert 0 < shared["b2a"][1] < 1


@pytest.mark.parametrize("dataset", ["esc50", "vggsound_s"])
def test_one_caption_per_class_synthetic_split(dataset):
    cfg = SyntheticConfig(dim=64, scale=0.5)
    info = DATASETS[dataset]
    ds = SyntheticDataset(SyntheticSpace(cfg), info)
    (_, labels, emb), = ds.rows("test", cfg.sizes(info)[1])
    text, audio = emb["text"], emb["audio"]
    targets = np.arange(len(text))
    g, e = partner_ranks(audio, text, targets, 10)
    np.testing.assert_array_equal(e, np.bincount(labels)[labels])   # the class's texts tie
    assert 0 < recall_from_ranks(g, e, (1,))[1] < recall_from_ranks(g, e, (10,))[10] < 1
    protos = ds.class_prototypes()
    g0, e0, gap = brute_ranks(audio, protos, labels, 1)
    g1, e1 = partner_ranks(audio, protos, labels, 1)
    clear = gap > 1e-5
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(g1[clear], g0[clear])
    assert zero_shot_accuracy(audio, protos, labels) == recall_from_ranks(g1, e1, (1,))[1]


def test_distinct_rows_come_in_order_of_first_occurrence():
    x = np.array([[3, 1], [0, 2], [3, 1], [5, 5], [0, 2]], dtype=np.float32)
    first, inverse, counts = retrieval.distinct_index(x)
    np.testing.assert_array_equal(first, [0, 1, 3])
    np.testing.assert_array_equal(inverse, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(counts, [2, 2, 1])
    np.testing.assert_array_equal(x[first][inverse], x)
    first, inverse, _ = retrieval.distinct_index(x[[4, 3, 0]])       # no repeats: the identity
    assert retrieval.is_identity(first) and retrieval.is_identity(inverse)
    assert not retrieval.is_identity(np.array([0, 2, 1])) and not retrieval.is_identity(np.array([1, 2]))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape, most", [((40, 30), 1), ((40, 30), 9), ((3, 70_000), 1), ((20, 10), 1 << 22)])
def test_tallies_equal_an_integer_brute_force(axis, shape, most):
    """Counts of marked candidates, each weighted by its multiplicity: exact in the byte sums
    (an axis longer than uint16 counts) and in the float products (weights summing past 2^24,
    where float32 would round)."""
    rng = np.random.default_rng(most)
    flags = rng.random(shape) < 0.97   # a 70,000-long row then counts past 65,535
    counts = rng.integers(1, most + 1, size=shape[axis], dtype=np.int64)
    if most > 1:
        counts[0] = most   # multiplicities present (not all 1)
    want = (flags * (counts[:, None] if axis == 0 else counts[None, :])).sum(axis=axis, dtype=np.int64)
    got = retrieval._tally(flags, counts, axis)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_read_only_arrays_are_scored_without_a_warning():
    """Scores go through torch, which warns about arrays it could write to but may not; scoring
    only reads them, so a read-only array (a memory map, say) is scored silently and the same."""
    import warnings

    rng = np.random.default_rng(3)
    xq, xb = rng.standard_normal((40, 16), dtype=np.float32), rng.standard_normal((30, 16), dtype=np.float32)
    want = retrieval.inner_products(xq, xb)
    np.testing.assert_allclose(want, xq.astype(np.float64) @ xb.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    for x in (xq, xb):
        x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = retrieval.inner_products(xq, xb)
        ranks = partner_ranks(xq, xb, np.arange(40) % 30, 10)
    np.testing.assert_array_equal(got, want)
    assert len(ranks[0]) == 40
