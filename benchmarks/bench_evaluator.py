"""Seconds per ``score()`` call on the paper's 11 test splits: FAISS top-k search with a recount of
ties (the evaluator before issue 14, kept here as "old") against exact counting over each pool's
distinct rows ("new", the evaluator now).

The test splits of the synthetic backbone at paper size (scale 1.0, d = 1024 by default; 654 to
4,374 pairs, 5 pools of 1,000 per split where larger) are built in memory, and ``score()`` is
timed with both implementations alternately in one process, so that both see the same machine
load. The two differ where FAISS's sgemm split an exact tie between copies of one text (the old
count's bug): the benchmark prints how many rows differ and by how much.

    python benchmarks/bench_evaluator.py
    python benchmarks/bench_evaluator.py --rounds 5 --learners perturbed
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import faiss
import numpy as np
import torch

from cmcl.data.catalog import DATASETS
from cmcl.data.paired import TestSet
from cmcl.data.protocol import load_protocol
from cmcl.evaluate import evaluator, retrieval
from cmcl.evaluate.evaluator import EvalSettings, score
from cmcl.extract.synthetic import SyntheticConfig, SyntheticDataset, SyntheticSpace
from cmcl.pipeline import embedder
from cmcl.train.learners import ModalityLearners


def old_partner_ranks(xq, xb, targets, k, *, use_gpu=False):
    """``partner_ranks`` before the blocked recount (it converted ``xb`` for every recounted query)."""
    nq = xq.shape[0]
    targets = np.asarray(targets, dtype=np.int64)
    kk = min(k, xb.shape[0])
    D, I = faiss.knn(np.ascontiguousarray(xq, dtype=np.float32), np.ascontiguousarray(xb, dtype=np.float32), kk,
                     metric=faiss.METRIC_INNER_PRODUCT)
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
        recount[missing[s >= last[missing] - 1e-5 * scale]] = True
    for i in np.flatnonzero(recount):
        scores = xb.astype(np.float32) @ xq[i].astype(np.float32)
        s = scores[targets[i]]
        g[i] = min(int((scores > s).sum()), k)
        e[i] = int((scores == s).sum())
    old_partner_ranks.recounted += int(recount.sum())
    return g, e


old_partner_ranks.recounted = 0


def old_paired_recall(ua, vb, ks=(1, 5, 10), *, protocol="paper", pool_size=1000, pool_count=5, seed=0,
                      use_gpu=False):
    """``paired_recall`` before issue 14: two top-k searches per pool, then the recount."""
    ua, vb = expand(ua), expand(vb)
    chosen = retrieval.pools(len(ua), size=pool_size, count=pool_count, seed=seed)
    acc = {"a2b": {k: 0.0 for k in ks}, "b2a": {k: 0.0 for k in ks}}
    for rows in chosen:
        for direction, (xq, xb) in (("a2b", (ua[rows], vb[rows])), ("b2a", (vb[rows], ua[rows]))):
            g, e = old_partner_ranks(xq, xb, np.arange(len(rows)), max(ks))
            for k, r in retrieval.recall_from_ranks(g, e, ks).items():
                acc[direction][k] += r / len(chosen)
    acc["mean"] = {k: 0.5 * (acc["a2b"][k] + acc["b2a"][k]) for k in ks}
    return acc


def old_zero_shot(xq, prototypes, labels, *, use_gpu=False):
    g, e = old_partner_ranks(expand(xq), expand(prototypes), labels, 1)
    return retrieval.recall_from_ranks(g, e, (1,))[1]


def expand(x):
    """An array given as its distinct rows and inverse map, as a full array."""
    return x[0][x[1]] if isinstance(x, tuple) else x


NEW = (evaluator.paired_recall, evaluator.zero_shot_accuracy)


def use(impl):
    """The evaluator looks these names up in its module at call time."""
    if impl == "old":
        evaluator.paired_recall, evaluator.zero_shot_accuracy = old_paired_recall, old_zero_shot
    else:
        evaluator.paired_recall, evaluator.zero_shot_accuracy = NEW


def test_sets(dim: int, scale: float) -> tuple[list[TestSet], dict]:
    """The paper11 test splits as ``StepData.test_sets`` gives them, built without a cache."""
    cfg = SyntheticConfig(dim=dim, scale=scale)
    space = SyntheticSpace(cfg)
    protocol = load_protocol("paper11")
    splits = {}
    for name in protocol.datasets:
        ds = SyntheticDataset(space, DATASETS[name])
        blocks = list(ds.rows("test", cfg.sizes(DATASETS[name])[1]))
        emb = {m: np.concatenate([b[2][m] for b in blocks]) for m in DATASETS[name].modalities}
        labels = np.concatenate([b[1] for b in blocks])
        protos = ds.class_prototypes() if DATASETS[name].n_classes else None
        splits[name] = (emb, labels, protos)
    sets = []
    for step in protocol.steps:
        emb, labels, protos = splits[step.dataset]
        a, b = step.modalities
        sets.append(TestSet(step, emb[a], emb[b], labels, protos if step.has_acc else None))
    return sets, splits


def make_learners(modalities, dim: int, kind: str) -> ModalityLearners:
    learners = ModalityLearners(modalities, dim)
    if kind == "perturbed":  # a trained-looking state: identity plus a seeded perturbation
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in learners.parameters():
                p.add_(0.5 / dim ** 0.5 * torch.randn(p.shape, generator=gen))
    return learners


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="score() calls per implementation")
    ap.add_argument("--learners", choices=["identity", "perturbed"], default="identity",
                    help="identity: row 0 of the result matrices (the frozen encoders)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, faiss "
          f"{faiss.__version__}, numpy {np.__version__}")
    t0 = time.perf_counter()
    sets, _ = test_sets(args.dim, args.scale)
    protocol = load_protocol("paper11")
    learners = make_learners(protocol.modalities, args.dim, args.learners)
    embed = embedder(learners)
    print(f"test splits: {len(sets)} steps, {sum(len(s.xa) for s in sets)} pairs, d={args.dim} "
          f"({time.perf_counter() - t0:.1f} s to build); learners: {args.learners}")

    times = {"old": [], "new": []}
    for r in range(args.rounds):
        rows = {}
        for impl in ("old", "new") if r % 2 == 0 else ("new", "old"):
            use(impl)
            old_partner_ranks.recounted = 0
            dt, rows[impl] = timed(lambda: score(embed, sets, 0, EvalSettings()))
            times[impl].append(dt)
            if impl == "old":
                recounted = old_partner_ranks.recounted
        use("new")
        diffs = [abs(a["value"] - b["value"]) for a, b in zip(rows["old"], rows["new"]) if a["value"] != b["value"]]
        print(f"round {r + 1}: old {times['old'][-1]:.2f} s ({recounted} queries recounted), new "
              f"{times['new'][-1]:.2f} s; {len(diffs)} of {len(rows['new'])} rows differ"
              + (f", by at most {max(diffs):.3f}" if diffs else ""))
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"score() median of {args.rounds}: old {old:.2f} s, new {new:.2f} s, old/new {old / new:.2f}x")


if __name__ == "__main__":
    main()
