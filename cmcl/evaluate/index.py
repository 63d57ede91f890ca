"""Retrieval indexes over embeddings: build, save, load and search with FAISS (pure, no models).

An index folder holds ``index.faiss`` (the FAISS index of the vectors), ``ids.txt`` (the id of
each indexed row, one per line, in index order) and ``index.json`` (what the vectors are: the
caller's metadata plus ``kind``, ``dim`` and ``count``). Scores are inner products, as in the
evaluation (:mod:`cmcl.evaluate.retrieval`).

Kinds: ``flat`` (exact search, the default), ``hnsw`` (a graph index: approximate, no training,
for large collections; ``hnsw_m`` neighbours per node) and ``ivf`` (an inverted file over
``nlist`` k-means cells, ``nprobe`` searched; approximate, trained on the vectors themselves).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from cmcl.errors import IndexFileError

INDEX_KINDS = ("flat", "hnsw", "ivf")
HIT_COLUMNS = ["query_id", "rank", "hit_id", "score"]


@dataclass
class Index:
    """A loaded index folder."""

    path: Path
    index: Any
    ids: np.ndarray
    meta: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])


def build(vectors: np.ndarray, ids: Sequence[str], *, kind: str = "flat", nlist: int | None = None,
          hnsw_m: int = 32, seed: int = 0) -> Any:
    """A FAISS inner-product index over ``vectors`` (N, D) of the given ``kind``."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        nlist = int(nlist or max(1, round(math.sqrt(n))))
        if nlist > n:
            raise IndexFileError(f"ivf index: nlist {nlist} exceeds the {n} vectors to index")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(nlist, 8)
    else:
        raise IndexFileError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    index.add(x)
    return index


def save(path: Path, index: Any, ids: Sequence[str], meta: dict[str, Any]) -> Path:
    """Write the index folder (each file written to ``.tmp`` and renamed; ``index.json`` last)."""
    path.mkdir(parents=True, exist_ok=True)
    ids = [str(i) for i in ids]
    if any("\n" in i or "\r" in i for i in ids):
        raise IndexFileError(f"{path}: an id contains a line break; ids are stored one per line")
    tmp = path / "index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path / "index.faiss")
    (path / "ids.txt.tmp").write_text("".join(i + "\n" for i in ids))
    os.replace(path / "ids.txt.tmp", path / "ids.txt")
    full = {**meta, "dim": int(index.d), "count": int(index.ntotal)}
    (path / "index.json.tmp").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    os.replace(path / "index.json.tmp", path / "index.json")
    return path


def load(path: Path) -> Index:
    """Read an index folder written by :func:`save`."""
    meta_path = path / "index.json"
    if not meta_path.is_file():
        raise IndexFileError(f"{path}: not an index folder (no index.json); build one with `cmcl index build`")
    try:
        meta = json.loads(meta_path.read_text())
        index = faiss.read_index(str(path / "index.faiss"))
        ids = np.array((path / "ids.txt").read_text().splitlines(), dtype=object)
    except (OSError, RuntimeError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"{path}: cannot read the index ({exc})") from None
    if len(ids) != index.ntotal or int(meta.get("count", -1)) != index.ntotal:
        raise IndexFileError(f"{path}: ids.txt has {len(ids)} ids but the index holds {index.ntotal} vectors")
    return Index(path, index, ids, meta)


def search(idx: Index, queries: np.ndarray, query_ids: Sequence[str], k: int = 10) -> pd.DataFrame:
    """The ``k`` best hits of each query: columns ``query_id, rank, hit_id, score`` (rank from 1)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != idx.dim:
        raise IndexFileError(f"{idx.path}: queries have dim {q.shape[-1]}, the index {idx.dim}")
    k = min(int(k), int(idx.index.ntotal))
    scores, rows = idx.index.search(q, k)
    keep = rows >= 0  # approximate indexes may return fewer than k hits
    qi, r = np.nonzero(keep)
    return pd.DataFrame({"query_id": np.asarray(query_ids, dtype=object)[qi], "rank": r + 1,
                         "hit_id": idx.ids[rows[qi, r]], "score": scores[qi, r]}, columns=HIT_COLUMNS)
