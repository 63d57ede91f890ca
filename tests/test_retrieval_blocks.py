"""The blocked recount of ``partner_ranks`` against the straightforward per-query one.

``reference_partner_ranks`` is the implementation before the recount was blocked (it converted
the whole candidate matrix to float32 for every recounted query). The blocked one must give the
same ``(g, e)`` bit for bit, on inputs where the recount does most of the work: exact ties from
small integers, duplicate candidate rows of continuous data, and one text per class as in the
synthetic backbone.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cmcl.data.catalog import DATASETS
from cmcl.evaluate import retrieval
from cmcl.evaluate.retrieval import partner_ranks, recall_from_ranks, zero_shot_accuracy
from cmcl.extract.synthetic import SyntheticConfig, SyntheticDataset, SyntheticSpace


def reference_partner_ranks(xq, xb, targets, k):
    """The per-query implementation, verbatim but for also returning which queries it recounted."""
    nq = xq.shape[0]
    targets = np.asarray(targets, dtype=np.int64)
    kk = min(k, xb.shape[0])
    D, I = faiss.knn(np.ascontiguousarray(xq, dtype=np.float32), np.ascontiguousarray(xb, dtype=np.float32),
                     kk, metric=faiss.METRIC_INNER_PRODUCT)
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
        recount[rows[(s == last[rows]) & (kk < xb.shape[0])]] = True
    missing = np.flatnonzero(~found)
    if len(missing):
        s = np.einsum("ij,ij->i", xq[missing].astype(np.float32), xb[targets[missing]].astype(np.float32))
        scale = np.maximum(np.abs(last[missing]), 1.0)
        recount[missing[s >= last[missing] - retrieval._NEAR_TIE * scale]] = True
    for i in np.flatnonzero(recount):
        scores = xb.astype(np.float32) @ xq[i].astype(np.float32)
        s = scores[targets[i]]
        g[i] = min(int((scores > s).sum()), k)
        e[i] = int((scores == s).sum())
    return g, e, recount


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_same_as_reference(xq, xb, targets, k, monkeypatch, min_recounted):
    g0, e0, recounted = reference_partner_ranks(xq, xb, targets, k)
    assert recounted.sum() >= min_recounted              # the recount path does real work here
    for block_bytes in (4 * xb.shape[0], 7 * 4 * xb.shape[0], retrieval._RECOUNT_BYTES):
        monkeypatch.setattr(retrieval, "_RECOUNT_BYTES", block_bytes)   # 1 row, 7 rows, default
        g, e = partner_ranks(xq, xb, targets, k)
        np.testing.assert_array_equal(g, g0)
        np.testing.assert_array_equal(e, e0)
    return g0, e0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 10])
def test_exact_integer_ties_match_the_per_query_reference(seed, k, monkeypatch):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2, size=(30, 5)).astype(np.float32)    # few distinct rows and scores
    xb = np.repeat(base, 7, axis=0)[rng.permutation(210)]            # every candidate 7 times at least
    xq = rng.integers(-1, 2, size=(203, 5)).astype(np.float32)
    targets = rng.integers(0, 210, size=203)
    g, e = assert_same_as_reference(xq, xb, targets, k, monkeypatch, min_recounted=30)
    assert (e[g < k] >= 7).all()                                       # duplicates always tie


@pytest.mark.parametrize("n", [400, 403, 1000])
def test_duplicate_candidate_rows_of_continuous_data_match_the_reference(n, monkeypatch):
    rng = np.random.default_rng(n)
    d, classes = 96, n // 8
    protos = unit_rows(rng, classes, d)
    labels = rng.integers(0, classes, size=n)
    other = protos[labels] + 0.8 * unit_rows(rng, n, d)            # a noisy view of each class
    targets = np.arange(n)
    # query -> duplicated candidates (the partner ties with its class's other texts) ...
    g, e = assert_same_as_reference(other, protos[labels], targets, 10, monkeypatch, min_recounted=n // 5)
    assert (e > 1).sum() > n // 4
    # ... and duplicated queries -> distinct candidates.
    assert_same_as_reference(protos[labels], other, targets, 10, monkeypatch, min_recounted=0)


@pytest.mark.parametrize("dataset", ["esc50", "vggsound_s"])
def test_one_caption_per_class_synthetic_split_matches_the_reference(dataset, monkeypatch):
    cfg = SyntheticConfig(dim=64, scale=0.5)
    info = DATASETS[dataset]
    ds = SyntheticDataset(SyntheticSpace(cfg), info)
    (_, labels, emb), = ds.rows("test", cfg.sizes(info)[1])
    text, audio = emb["text"], emb["audio"]
    targets = np.arange(len(text))
    g, e = assert_same_as_reference(audio, text, targets, 10, monkeypatch, min_recounted=len(text) // 20)
    assert 0 < recall_from_ranks(g, e, (1,))[1] < recall_from_ranks(g, e, (10,))[10] < 1
    assert_same_as_reference(text, audio, targets, 10, monkeypatch, min_recounted=0)
    # zero-shot: k = 1 against the class prototypes
    protos = ds.class_prototypes()
    g0, e0, _ = reference_partner_ranks(audio, protos, labels, 1)
    assert zero_shot_accuracy(audio, protos, labels) == recall_from_ranks(g0, e0, (1,))[1]


def test_float64_and_fortran_ordered_inputs_match_the_reference(monkeypatch):
    rng = np.random.default_rng(5)
    protos = unit_rows(rng, 40, 32)
    labels = rng.integers(0, 40, size=301)
    xb = protos[labels]
    xq = xb + 0.5 * unit_rows(rng, 301, 32)
    targets = np.arange(301)
    for q, b in ((xq.astype(np.float64), xb.astype(np.float64)), (np.asfortranarray(xq), np.asfortranarray(xb))):
        assert_same_as_reference(q, b, targets, 10, monkeypatch, min_recounted=30)
