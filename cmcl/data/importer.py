"""Bring your own pairs: write a ``cmcl.features/1`` split from embeddings another tool computed.

``cmcl import`` reads one array per modality (``.npy``, ``.npz`` with a single array or an array
named after the modality, ``.safetensors`` with a single tensor or one named after the modality,
``.parquet`` with one list/array column or a column named after the modality), optional ids (a
text file, one per line; default the row numbers), integer labels (``.npy``) and class names with
their text prototypes (for zero-shot accuracy), checks them, and writes the split atomically
through :class:`cmcl.data.features.FeatureWriter` (which also locks the file).

Checks: every array is 2-D with the same rows and the same width, finite, L2-normalised (or
normalised here with ``normalize=True``); ids unique, no line breaks; labels integers of the
right length (``-1`` for unlabelled), within the class list when one is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cmcl.data.features import NORM_TOLERANCE, ShardMeta, shard_path, write_split
from cmcl.errors import EmbeddingImportError
from cmcl.types import check_modality_name

ARRAY_SUFFIXES = (".npy", ".npz", ".safetensors", ".parquet")


def _pick(names: list[str], modality: str, path: Path) -> str:
    if modality in names:
        return modality
    if len(names) == 1:
        return names[0]
    raise EmbeddingImportError(f"{path}: holds {len(names)} arrays ({', '.join(names[:6])}); "
                               f"name one after the modality ({modality!r}) or keep only one")


def load_array(path: str | os.PathLike, modality: str = "") -> np.ndarray:
    """Read one (N, D) array from ``.npy``, ``.npz``, ``.safetensors`` or ``.parquet``."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingImportError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z[_pick(list(z.files), modality, path)]
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            return tensors[_pick(sorted(tensors), modality, path)]
        if suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path)
            column = frame[_pick(list(frame.columns), modality, path)]
            return np.stack([np.asarray(v, dtype=np.float32) for v in column]) if len(column) else np.zeros((0, 0))
    except EmbeddingImportError:
        raise
    except ImportError as exc:
        raise EmbeddingImportError(f"{path}: reading {suffix} needs an optional package ({exc})") from None
    except Exception as exc:  # numpy, safetensors and pyarrow raise many types for bad files
        raise EmbeddingImportError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    raise EmbeddingImportError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(ARRAY_SUFFIXES)}")


def _embeddings(x: np.ndarray, where: str, normalize: bool) -> np.ndarray:
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise EmbeddingImportError(f"{where}: dtype {x.dtype} is not numeric")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise EmbeddingImportError(f"{where}: expected a non-empty 2-D array (rows, dim), got shape {x.shape}")
    x = x.astype(np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise EmbeddingImportError(f"{where}: non-finite values (NaN or inf), first in row {int(np.argmin(finite))}")
    norms = np.linalg.norm(x, axis=1)
    if normalize:
        if (norms == 0).any():
            raise EmbeddingImportError(f"{where}: row {int(np.argmax(norms == 0))} is all zeros and cannot be normalised")
        return x / norms[:, None]
    worst = int(np.argmax(np.abs(norms - 1.0)))
    if abs(norms[worst] - 1.0) > NORM_TOLERANCE:
        raise EmbeddingImportError(f"{where}: row {worst} has norm {norms[worst]:.4f}, rows must be L2-normalised "
                                   f"(pass --normalize to normalise them)")
    return x


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids from a text file, one per line (a trailing empty line is ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbeddingImportError(f"{path}: cannot read ids ({exc})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            raise EmbeddingImportError(f"{path}: line {i} is empty; give one id per line")
    return lines


def import_embeddings(out: str | os.PathLike, backbone: str, dataset: str, split: str,
                      emb: Mapping[str, str | os.PathLike | np.ndarray], *, ids: str | os.PathLike | None = None,
                      labels: str | os.PathLike | np.ndarray | None = None,
                      class_names: str | os.PathLike | None = None,
                      class_emb: Mapping[str, str | os.PathLike | np.ndarray] | None = None,
                      normalize: bool = False, overwrite: bool = False) -> Path:
    """Check embeddings computed elsewhere and write them as ``<out>/<backbone>/<dataset>/<split>.h5``.

    Args:
        out: feature-cache root.
        backbone, dataset, split: where the split goes (any names).
        emb: modality -> array file (or array): one row per sample, rows paired across modalities.
        ids: text file with one id per row (default: row numbers ``0 .. N-1``).
        labels: integer ``.npy`` of class indices per row (``-1``: unlabelled; default all ``-1``).
        class_names: text file with one class name per line (for zero-shot accuracy).
        class_emb: modality -> (C, D) prototypes of the class names (``text`` is the zero-shot one).
        normalize: L2-normalise rows instead of requiring normalised rows.
        overwrite: replace an existing split.

    Returns:
        The written file.
    """
    if not emb:
        raise EmbeddingImportError("give at least one --emb MODALITY=FILE")
    for name in (backbone, dataset, split):
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise EmbeddingImportError(f"invalid name {name!r} for a backbone, dataset or split folder")
    arrays: dict[str, np.ndarray] = {}
    for modality, src in emb.items():
        try:
            check_modality_name(modality)
        except ValueError as exc:
            raise EmbeddingImportError(f"--emb {modality}=...: {exc}") from None
        where = str(src) if not isinstance(src, np.ndarray) else f"--emb {modality}"
        x = src if isinstance(src, np.ndarray) else load_array(src, modality)
        arrays[modality] = _embeddings(np.asarray(x), where, normalize)
    first = next(iter(arrays))
    n, d = arrays[first].shape
    for m, x in arrays.items():
        if x.shape[0] != n:
            raise EmbeddingImportError(f"--emb {m}: {x.shape[0]} rows but --emb {first} has {n}; rows must be paired")
        if x.shape[1] != d:
            raise EmbeddingImportError(f"--emb {m}: dim {x.shape[1]} but --emb {first} has {d}; "
                                       f"every modality must share one embedding space")
    id_list = read_ids(ids) if ids is not None else [str(i) for i in range(n)]
    if len(id_list) != n:
        raise EmbeddingImportError(f"{ids}: {len(id_list)} ids for {n} rows")
    seen: set[str] = set()
    for i, v in enumerate(id_list, start=1):
        if v in seen:
            raise EmbeddingImportError(f"{ids}: id {v!r} repeats (line {i}); ids must be unique")
        seen.add(v)
    if labels is None:
        lab = np.full(n, -1, dtype=np.int64)
    else:
        where = str(labels) if not isinstance(labels, np.ndarray) else "--labels"
        raw = labels if isinstance(labels, np.ndarray) else load_array(labels)
        raw = np.asarray(raw)
        if not np.issubdtype(raw.dtype, np.integer):
            raise EmbeddingImportError(f"{where}: labels must be integers, got dtype {raw.dtype}")
        if raw.shape != (n,):
            raise EmbeddingImportError(f"{where}: labels of shape {raw.shape}, expected ({n},)")
        if (raw < -1).any():
            raise EmbeddingImportError(f"{where}: labels must be >= 0 (or -1 for unlabelled), found {int(raw.min())}")
        lab = raw.astype(np.int64)
    names = protos = None
    if (class_names is None) != (not class_emb):
        raise EmbeddingImportError("--class-names and --class-emb go together (names and their prototypes)")
    if class_names is not None:
        names = read_ids(class_names)
        protos = {}
        for m, src in (class_emb or {}).items():
            where = str(src) if not isinstance(src, np.ndarray) else f"--class-emb {m}"
            x = _embeddings(np.asarray(src if isinstance(src, np.ndarray) else load_array(src, m)), where, normalize)
            if x.shape != (len(names), d):
                raise EmbeddingImportError(f"{where}: shape {x.shape}, expected ({len(names)}, {d}): "
                                           f"one row per class name of {class_names}")
            protos[m] = x
        if (lab >= len(names)).any():
            raise EmbeddingImportError(f"labels reach {int(lab.max())} but {class_names} names {len(names)} classes")
    path = shard_path(out, backbone, dataset, split)
    meta = ShardMeta(backbone=backbone, dataset=dataset, split=split, dim=d, modalities=tuple(arrays),
                     normalized=True, extra={"imported": "cmcl import" + (" --normalize" if normalize else "")})
    return write_split(path, meta, id_list, lab, arrays, class_names=names, class_emb=protos, overwrite=overwrite)
