"""Seconds per ``score()`` call on the paper's 11 test splits, before and after the blocked recount.

The test splits of the synthetic backbone at paper size (scale 1.0, d = 1024 by default; 654 to
4,374 pairs, 5 pools of 1,000 per split where larger) are built in memory, and ``score()`` is
timed with the current ``partner_ranks`` ("new") and with the per-query implementation it replaced
("old", kept below as the reference), alternately in one process, so that both see the same
machine load. Every round checks that both give the same rows, value for value. Then
``partner_ranks`` alone is timed on a tie-heavy case: vggsound_s audio queries against its texts
(one text per class, so the partner ties with the other texts of its class).

    python benchmarks/bench_evaluator.py                   # 3.3-4.5 min on 2 busy cores (load 5-7)
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
from cmcl.evaluate import retrieval
from cmcl.evaluate.evaluator import EvalSettings, score
from cmcl.extract.synthetic import SyntheticConfig, SyntheticDataset, SyntheticSpace
from cmcl.pipeline import embedder
from cmcl.train.learners import ModalityLearners


def old_partner_ranks(xq, xb, targets, k, *, use_gpu=False):
    """``partner_ranks`` before the blocked recount (it converted ``xb`` for every recounted query)."""
    nq = xq.shape[0]
    targets = np.asarray(targets, dtype=np.int64)
    kk = min(k, xb.shape[0])
    D, I = retrieval.knn(xq, xb, kk, use_gpu=use_gpu)
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
    old_partner_ranks.recounted += int(recount.sum())
    return g, e


old_partner_ranks.recounted = 0
NEW_PARTNER_RANKS = retrieval.partner_ranks


def use(impl):
    # recall_at_k and zero_shot_accuracy look partner_ranks up in the module at call time.
    retrieval.partner_ranks = old_partner_ranks if impl == "old" else NEW_PARTNER_RANKS


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
    ap.add_argument("--pair-rounds", type=int, default=3, help="partner_ranks calls per implementation")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, faiss "
          f"{faiss.__version__}, numpy {np.__version__}")
    t0 = time.perf_counter()
    sets, splits = test_sets(args.dim, args.scale)
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
        if rows["old"] != rows["new"]:
            raise SystemExit("score(): the old and new partner_ranks give different rows")
        print(f"round {r + 1}: old {times['old'][-1]:.2f} s, new {times['new'][-1]:.2f} s "
              f"({len(rows['new'])} rows identical; {recounted} queries recounted)")
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"score() median of {args.rounds}: old {old:.2f} s, new {new:.2f} s, old/new {old / new:.2f}x")

    # partner_ranks alone, tie-heavy: audio queries against one text per class (vggsound_s).
    emb, labels, _ = splits["vggsound_s"]
    with torch.no_grad():
        xq = learners("audio", torch.as_tensor(emb["audio"])).numpy()
        xb = learners("text", torch.as_tensor(emb["text"])).numpy()
    chosen = retrieval.pools(len(xq), seed=0)
    pt = {"old": [], "new": []}
    for r in range(args.pair_rounds):
        for impl in ("old", "new") if r % 2 == 0 else ("new", "old"):
            fn = old_partner_ranks if impl == "old" else NEW_PARTNER_RANKS
            old_partner_ranks.recounted = 0
            dt, res = timed(lambda: [fn(xq[p], xb[p], np.arange(len(p)), 10) for p in chosen])
            pt[impl].append(dt)
            if impl == "old":
                ref, recounted = res, old_partner_ranks.recounted
            else:
                got = res
        if any((a[0] != b[0]).any() or (a[1] != b[1]).any() for a, b in zip(ref, got)):
            raise SystemExit("partner_ranks: the old and new implementations differ")
    old, new = statistics.median(pt["old"]), statistics.median(pt["new"])
    n = sum(len(p) for p in chosen)
    print(f"partner_ranks, vggsound_s audio->text, {len(chosen)} pools of {len(chosen[0])} ({recounted} of {n} "
          f"queries recounted), median of {args.pair_rounds}: old {old:.3f} s, new {new:.3f} s, "
          f"old/new {old / new:.2f}x")


if __name__ == "__main__":
    main()
