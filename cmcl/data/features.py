"""The feature cache: HDF5 embedding shards, schema ``cmcl.features/1``.

One split of one dataset embedded by one backbone lives at
``<root>/<backbone>/<dataset>/<split>.h5``, or in several shard files
``<split>-00000-of-00004.h5`` that readers treat as one split (rows concatenated in shard order).
The layout is documented for other tools in ``docs/feature-cache.md``; this module is its
reference implementation.

Writing goes through :class:`FeatureWriter`, which fills ``<file>.partial`` and moves it into
place only after validation, so a reader never sees a half-written file. Reading goes through
:func:`open_split` (or :class:`FeatureShard` for one file), which validates everything it loads
and raises :class:`~cmcl.errors.CacheError` naming the file and the problem; :func:`check_split`
runs the same validation a block of rows at a time, holding none of the split.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from cmcl import __version__
from cmcl.data import locks
from cmcl.errors import CacheError
from cmcl.types import check_modality_name

SCHEMA = "cmcl.features/1"
#: Root attributes every shard carries.
REQUIRED_ATTRS = (
    "schema", "backbone", "dataset", "split", "dim", "modalities", "normalized",
    "cmcl_version", "created_utc", "checkpoint",
)
#: Tolerance on ``| ||x|| - 1 |`` for shards that declare ``normalized``.
NORM_TOLERANCE = 1e-3
_STR = h5py.string_dtype("utf-8")
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.h5$")
_ROW_CHUNK_BYTES = 1 << 20
#: Bytes of embeddings held at once when a file's values are checked without loading it.
_CHECK_BLOCK_BYTES = 32 << 20


def shard_path(root: str | os.PathLike, backbone: str, dataset: str, split: str,
               shard: int | None = None, num_shards: int | None = None) -> Path:
    """Path of a split file, or of one shard of it when ``shard``/``num_shards`` are given."""
    folder = Path(root) / backbone / dataset
    if shard is None:
        return folder / f"{split}.h5"
    if num_shards is None or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    return folder / f"{split}-{shard:05d}-of-{num_shards:05d}.h5"


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """``"train-00001-of-00004.h5"`` -> ``("train", 1, 4)``; ``None`` for a name that is not a shard."""
    m = _SHARD_RE.match(name)
    return (m.group("split"), int(m.group("index")), int(m.group("count"))) if m else None


@dataclass(frozen=True)
class ShardMeta:
    """Root attributes of a shard.

    Attributes:
        backbone: encoder name, e.g. ``"imagebind"``; any name is accepted when reading.
        dataset: dataset name.
        split: split name, e.g. ``"train"``.
        dim: embedding width D, shared by every modality.
        modalities: modality names present under ``/emb``.
        normalized: whether rows are L2-normalised (checked on write and read).
        checkpoint: the weights the backbone was loaded from; ``""`` when none.
        cmcl_version: version of the tool that wrote the file.
        created_utc: ISO-8601 UTC time of writing.
        extra: further root attributes (encoder preprocessing, ``random_weights``...), kept as is.
    """

    backbone: str
    dataset: str
    split: str
    dim: int
    modalities: tuple[str, ...]
    normalized: bool = True
    checkpoint: str = ""
    cmcl_version: str = __version__
    created_utc: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass
class SplitFeatures:
    """One split loaded into memory (float32 embeddings).

    Attributes:
        meta: root attributes (of the first shard when the split is sharded).
        paths: the files the split was read from.
        ids: (N,) unique sample ids, numpy ``object`` array of ``str``.
        labels: (N,) int64 class indices, -1 where unlabelled.
        emb: modality -> (N, D) float32 array, only the modalities that were asked for.
        text: (N,) captions when stored, else ``None``.
        class_names: (C,) class names for zero-shot classification, else ``None``.
        class_emb: (C, D) text embeddings of the class names, else ``None``.
    """

    meta: ShardMeta
    paths: list[Path]
    ids: np.ndarray
    labels: np.ndarray
    emb: dict[str, np.ndarray]
    text: np.ndarray | None = None
    class_names: np.ndarray | None = None
    class_emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def where(self) -> str:
        """The file (or shard pattern) this split came from, for error messages."""
        return where_of(self.paths)


def where_of(paths: Sequence[Path]) -> str:
    """A split's files as error messages name them: the file, or the first shard and how many more."""
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} shards)"


# --------------------------------------------------------------------------------------- writing
class FeatureWriter:
    """Write one shard atomically.

    Rows are appended in blocks to ``<path>.partial``; :meth:`close` validates the whole file
    (row counts, unique ids, finiteness, norms when ``meta.normalized``) and renames it into place
    with :func:`os.replace`. Used as a context manager, an exception inside the block removes the
    partial file. The writer holds ``<path>.lock`` from start to end: a second process writing the
    same shard fails at once (:class:`cmcl.data.locks.BusyError`).

    With ``check_blocks=True`` each block's embeddings are checked (finite, unit norm when
    ``meta.normalized``) as they are appended, while still in memory, and :meth:`close` checks
    only the structure and ids instead of reading every embedding back; same guarantees, about
    twice the throughput for large shards.

    Example::

        with FeatureWriter(path, meta) as w:
            w.append(ids, labels, {"text": t, "audio": a})
            w.set_classes(names, {"text": class_text})
    """

    def __init__(self, path: str | os.PathLike, meta: ShardMeta, *, overwrite: bool = False,
                 check_blocks: bool = False) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.meta = meta
        self.check_blocks = check_blocks
        if not meta.modalities:
            raise CacheError(f"{self.path}: a shard needs at least one modality")
        for m in meta.modalities:
            try:
                check_modality_name(m)
            except ValueError as exc:
                raise CacheError(f"{self.path}: {exc}") from None
        if len(set(meta.modalities)) != len(meta.modalities):
            raise CacheError(f"{self.path}: duplicate modality in {list(meta.modalities)}")
        if int(meta.dim) <= 0:
            raise CacheError(f"{self.path}: dim must be positive, got {meta.dim}")
        if self.path.exists() and not overwrite:
            raise CacheError(f"{self.path} already exists (pass overwrite=True / --overwrite to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        locks.acquire(self.path, "feature file")
        try:
            self._h5 = h5py.File(self.partial, "w")
        except BaseException:
            locks.release(self.path)
            raise
        self._n = 0
        self._closed = False
        self._write_attrs()
        d = int(meta.dim)
        chunk_rows = max(1, min(4096, _ROW_CHUNK_BYTES // (4 * d)))
        self._h5.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(4096,))
        self._h5.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        grp = self._h5.create_group("emb")
        for m in meta.modalities:
            grp.create_dataset(m, shape=(0, d), maxshape=(None, d), dtype=np.float32,
                               chunks=(chunk_rows, d))
        self._has_text: bool | None = None

    def _write_attrs(self) -> None:
        m = self.meta
        created = m.created_utc or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        attrs = self._h5.attrs
        for key, value in m.extra.items():
            attrs[key] = value
        attrs["schema"] = SCHEMA
        attrs["backbone"] = m.backbone
        attrs["dataset"] = m.dataset
        attrs["split"] = m.split
        attrs["dim"] = int(m.dim)
        attrs.create("modalities", list(m.modalities), dtype=_STR)
        attrs["normalized"] = bool(m.normalized)
        attrs["cmcl_version"] = m.cmcl_version
        attrs["created_utc"] = created
        attrs["checkpoint"] = m.checkpoint

    def __len__(self) -> int:
        return self._n

    def append(self, ids: Sequence[str], labels: Sequence[int] | np.ndarray,
               emb: Mapping[str, np.ndarray], text: Sequence[str] | None = None) -> None:
        """Append a block of rows: ``emb`` must hold every modality of the shard."""
        n = len(ids)
        if set(emb) != set(self.meta.modalities):
            raise CacheError(f"{self.path}: append got modalities {sorted(emb)}, "
                             f"shard has {sorted(self.meta.modalities)}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise CacheError(f"{self.path}: {n} ids but labels of shape {labels.shape}")
        if self._has_text is None:
            self._has_text = text is not None
            if text is not None:
                self._h5.create_dataset("text", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(4096,))
        elif self._has_text != (text is not None):
            raise CacheError(f"{self.path}: text must be given for every block or for none")
        arrays = {}
        for m, x in emb.items():
            x = np.asarray(x)
            if x.shape != (n, self.meta.dim):
                raise CacheError(f"{self.path}: /emb/{m} block has shape {x.shape}, expected ({n}, {self.meta.dim})")
            arrays[m] = x.astype(np.float32, copy=False)
        if self.check_blocks:
            for m, x in arrays.items():
                check_embeddings(x, f"{self.path}: /emb/{m} rows {self._n}-{self._n + n - 1}", self.meta.normalized)
        lo, hi = self._n, self._n + n
        self._resize_write("ids", lo, hi, np.asarray(list(ids), dtype=object))
        self._resize_write("labels", lo, hi, labels)
        if text is not None:
            if len(text) != n:
                raise CacheError(f"{self.path}: {n} ids but {len(text)} texts")
            self._resize_write("text", lo, hi, np.asarray(list(text), dtype=object))
        for m, x in arrays.items():
            self._resize_write(f"emb/{m}", lo, hi, x)
        self._n = hi

    def _resize_write(self, name: str, lo: int, hi: int, values: np.ndarray) -> None:
        ds = self._h5[name]
        ds.resize(hi, axis=0)
        ds[lo:hi] = values

    def set_classes(self, names: Sequence[str], emb: Mapping[str, np.ndarray]) -> None:
        """Store class names and their prototypes (``emb['text']`` is the zero-shot one)."""
        names = list(names)
        grp = self._h5.require_group("classes")
        if "names" in grp:
            raise CacheError(f"{self.path}: classes were already set")
        grp.create_dataset("names", data=np.asarray(names, dtype=object), dtype=_STR)
        eg = grp.create_group("emb")
        for m, x in emb.items():
            check_modality_name(m)
            x = np.asarray(x, dtype=np.float32)
            if x.shape != (len(names), self.meta.dim):
                raise CacheError(f"{self.path}: /classes/emb/{m} has shape {x.shape}, "
                                 f"expected ({len(names)}, {self.meta.dim})")
            eg.create_dataset(m, data=x)

    def abort(self) -> None:
        """Close and delete the partial file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._h5.close()
        finally:
            self.partial.unlink(missing_ok=True)
            locks.release(self.path)

    def close(self) -> Path:
        """Validate, flush and move the shard into place; returns the final path."""
        if self._closed:
            return self.path
        if self._n == 0:
            self.abort()
            raise CacheError(f"{self.path}: refusing to write an empty split (no rows were appended)")
        try:
            self._h5.flush()
            self._h5.close()
            self._closed = True
            with FeatureShard(self.partial) as shard:
                shard.check(embeddings=not self.check_blocks)
            os.replace(self.partial, self.path)
        except BaseException:
            self._closed = True
            self.partial.unlink(missing_ok=True)
            raise
        finally:
            locks.release(self.path)
        return self.path

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_split(path: str | os.PathLike, meta: ShardMeta, ids: Sequence[str], labels: np.ndarray,
                emb: Mapping[str, np.ndarray], *, text: Sequence[str] | None = None,
                class_names: Sequence[str] | None = None,
                class_emb: Mapping[str, np.ndarray] | None = None, overwrite: bool = False) -> Path:
    """Write a whole split held in memory as one shard (atomic); returns the path."""
    with FeatureWriter(path, meta, overwrite=overwrite) as w:
        w.append(ids, labels, emb, text)
        if class_names is not None:
            w.set_classes(class_names, class_emb or {})
    return w.path


# --------------------------------------------------------------------------------------- reading
def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class FeatureShard:
    """One shard file, opened read-only; use as a context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"{self.path}: no such feature file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise CacheError(f"{self.path}: not a readable HDF5 file (corrupt or truncated?): {exc}") from None
        try:
            self.meta = self._read_meta()
        except Exception:
            self._h5.close()
            raise

    def _fail(self, problem: str) -> CacheError:
        return CacheError(f"{self.path}: {problem}")

    def _read_meta(self) -> ShardMeta:
        attrs = self._h5.attrs
        schema = _as_str(attrs.get("schema", ""))
        if schema != SCHEMA:
            raise self._fail(f"schema is {schema!r}, expected {SCHEMA!r}" if schema else
                             f"no 'schema' attribute: not a cmcl feature file (expected {SCHEMA!r})")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise self._fail(f"missing root attributes {missing}")
        mods = attrs["modalities"]
        mods = tuple(_as_str(m) for m in (mods if isinstance(mods, np.ndarray) else [mods]))
        if "emb" not in self._h5:
            raise self._fail("no /emb group")
        stored = tuple(self._h5["emb"].keys())
        if set(stored) != set(mods):
            raise self._fail(f"attribute modalities={list(mods)} but /emb holds {list(stored)}")
        extra = {k: attrs[k] for k in attrs if k not in REQUIRED_ATTRS}
        try:
            dim = int(attrs["dim"])
        except (TypeError, ValueError):
            raise self._fail(f"attribute dim={attrs['dim']!r} is not an integer") from None
        return ShardMeta(
            backbone=_as_str(attrs["backbone"]), dataset=_as_str(attrs["dataset"]),
            split=_as_str(attrs["split"]), dim=dim, modalities=mods,
            normalized=bool(attrs["normalized"]), checkpoint=_as_str(attrs["checkpoint"]),
            cmcl_version=_as_str(attrs["cmcl_version"]), created_utc=_as_str(attrs["created_utc"]),
            extra=extra,
        )

    def __enter__(self) -> "FeatureShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._h5.close()

    def __len__(self) -> int:
        return int(self._dataset("ids").shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities stored under ``/emb``."""
        return self.meta.modalities

    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in self._h5:
            raise self._fail(f"missing dataset /{name}")
        ds = self._h5[name]
        if not isinstance(ds, h5py.Dataset):
            raise self._fail(f"/{name} is not a dataset")
        return ds

    def _read(self, name: str):
        try:
            return self._dataset(name)[()]
        except (OSError, ValueError) as exc:
            raise self._fail(f"cannot read /{name} (corrupt or truncated file?): {exc}") from None

    def _strings(self, name: str) -> np.ndarray:
        ds = self._dataset(name)
        if ds.ndim != 1 or h5py.check_string_dtype(ds.dtype) is None:
            raise self._fail(f"/{name} must be a 1-D UTF-8 string dataset, got {ds.dtype} {ds.shape}")
        try:
            return ds.asstr()[()].astype(object) if len(ds) else np.empty(0, dtype=object)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise self._fail(f"cannot read /{name}: {exc}") from None

    @property
    def ids(self) -> np.ndarray:
        """(N,) sample ids as ``str`` objects."""
        return self._strings("ids")

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels."""
        ds = self._dataset("labels")
        if ds.ndim != 1 or not np.issubdtype(ds.dtype, np.integer):
            raise self._fail(f"/labels must be a 1-D integer dataset, got {ds.dtype} {ds.shape}")
        return np.asarray(self._read("labels"), dtype=np.int64)

    @property
    def text(self) -> np.ndarray | None:
        """(N,) captions, or ``None`` when the shard has no ``/text``."""
        return self._strings("text") if "text" in self._h5 else None

    def load(self, modality: str) -> np.ndarray:
        """(N, D) float32 embeddings of ``modality`` (float16 storage is converted)."""
        self._emb_dataset(modality)
        return np.asarray(self._read(f"emb/{modality}"), dtype=np.float32)

    def _emb_dataset(self, modality: str) -> h5py.Dataset:
        """``/emb/<modality>``, checked to exist with an accepted dtype and shape (N, D)."""
        if modality not in self.meta.modalities:
            raise self._fail(f"has no modality {modality!r} (it holds {list(self.meta.modalities)})")
        ds = self._dataset(f"emb/{modality}")
        self._check_emb_dataset(ds, f"emb/{modality}", len(self))
        return ds

    def check_values(self, modality: str, *, block_bytes: int | None = None) -> None:
        """Check the values of ``modality``'s embeddings as :meth:`load` would (finite; unit rows when
        the shard is declared normalized), reading them a block of rows at a time into one buffer, so
        that a large file is checked without holding it (or paying for fresh memory) whole."""
        name, ds = f"emb/{modality}", self._emb_dataset(modality)
        n, d = len(self), self.meta.dim
        rows = max(1, (block_bytes or _CHECK_BLOCK_BYTES) // (4 * d))
        buffer = np.empty((min(rows, n), d), dtype=np.float32)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            block = buffer[:hi - lo]
            try:
                ds.read_direct(block, np.s_[lo:hi], np.s_[0:hi - lo])
            except (OSError, ValueError, TypeError) as exc:
                raise self._fail(f"cannot read /{name} (corrupt or truncated file?): {exc}") from None
            check_embeddings(block, f"{self.path}: /{name}", self.meta.normalized, first_row=lo)

    def _check_emb_dataset(self, ds: h5py.Dataset, name: str, n: int) -> None:
        if ds.dtype not in (np.float32, np.float16):
            raise self._fail(f"/{name} has dtype {ds.dtype}, expected float32 or float16")
        if ds.shape != (n, self.meta.dim):
            raise self._fail(f"/{name} has shape {ds.shape}, expected ({n}, {self.meta.dim})")

    def classes(self) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """``(names, {modality: (C, D) prototypes})``, or ``None`` without ``/classes``."""
        if "classes" not in self._h5:
            return None
        names = self._strings("classes/names")
        protos = {}
        if "classes/emb" in self._h5:
            for m in self._h5["classes/emb"]:
                ds = self._dataset(f"classes/emb/{m}")
                self._check_emb_dataset(ds, f"classes/emb/{m}", len(names))
                protos[m] = np.asarray(self._read(f"classes/emb/{m}"), dtype=np.float32)
        return names, protos

    def check(self, modalities: Iterable[str] | None = None, *, embeddings: bool = True) -> None:
        """Validate the shard: shapes, dtypes, finiteness, unique ids and (when declared) norms.

        Args:
            modalities: check only these embeddings (default: all).
            embeddings: ``False`` checks shapes and dtypes of the embeddings but not their values
                (for writers that checked every block as it was appended).
        """
        n = len(self)
        if n == 0:
            raise self._fail("the split is empty (0 rows)")
        ids = self.ids
        if len(set(ids.tolist())) != n:
            raise self._fail(f"ids are not unique ({n - len(set(ids.tolist()))} duplicates, "
                             f"e.g. {_first_duplicate(ids)!r})")
        if self.labels.shape != (n,):
            raise self._fail(f"/labels has {len(self.labels)} rows, /ids has {n}")
        text = self.text
        if text is not None and text.shape != (n,):
            raise self._fail(f"/text has {len(text)} rows, /ids has {n}")
        for m in (modalities or self.meta.modalities):
            if embeddings:
                self.check_values(m)
            elif m not in self.meta.modalities:
                raise self._fail(f"has no modality {m!r} (it holds {list(self.meta.modalities)})")
            else:
                self._check_emb_dataset(self._dataset(f"emb/{m}"), f"emb/{m}", n)
        cls = self.classes()
        if cls is not None:
            names, protos = cls
            for m, x in protos.items():
                check_embeddings(x, f"{self.path}: /classes/emb/{m}", self.meta.normalized)


def _first_duplicate(ids: np.ndarray) -> str:
    seen = set()
    for i in ids.tolist():
        if i in seen:
            return i
        seen.add(i)
    return ""


def check_embeddings(x: np.ndarray, where: str, normalized: bool, *, first_row: int = 0) -> None:
    """Raise :class:`CacheError` if ``x`` has non-finite values or (when ``normalized``) non-unit rows.

    One pass computes every row's sum of squares, which is not finite exactly when the row holds a
    NaN or an infinity, or when its finite values are so large that the squares overflow; only such
    rows are then checked value by value. Rows are numbered from ``first_row`` in the messages
    (for a block of a longer array).
    """
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float32) if len(x) else np.zeros(0, np.float32)
    suspect = np.flatnonzero(~np.isfinite(sq))
    if len(suspect):
        bad = suspect[~np.isfinite(x[suspect]).all(axis=1)]
        if len(bad):
            raise CacheError(f"{where}: non-finite values (NaN or inf), first in row {first_row + int(bad[0])}")
    if normalized and len(x):
        norms = np.sqrt(sq)  # float32 is ample for the 1e-3 tolerance
        worst = int(np.argmax(np.abs(norms - 1.0)))
        if abs(norms[worst] - 1.0) > NORM_TOLERANCE:
            raise CacheError(f"{where}: declared normalized but row {first_row + worst} has norm {norms[worst]:.4f}")


def split_files(root: str | os.PathLike, backbone: str, dataset: str, split: str) -> list[Path]:
    """The file(s) holding a split: ``<split>.h5`` or every ``<split>-NNNNN-of-MMMMM.h5`` shard.

    Raises :class:`CacheError` when none exists, when both forms exist, or when shards are missing.
    """
    folder = Path(root) / backbone / dataset
    single = folder / f"{split}.h5"
    shards: dict[int, Path] = {}
    counts = set()
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SHARD_RE.match(p.name)
            if m and m.group("split") == split:
                shards[int(m.group("index"))] = p
                counts.add(int(m.group("count")))
    if single.is_file():
        if shards:
            raise CacheError(f"{folder}: both {single.name} and shard files of split {split!r} exist; keep one form")
        return [single]
    if not shards:
        raise CacheError(f"{single}: no such feature file (nor shards {split}-NNNNN-of-MMMMM.h5); "
                         f"run `cmcl extract` for backbone {backbone!r}, dataset {dataset!r}")
    if len(counts) != 1:
        raise CacheError(f"{folder}: shards of split {split!r} disagree on the shard count {sorted(counts)}")
    count = counts.pop()
    missing = [i for i in range(count) if i not in shards]
    if missing or any(i >= count for i in shards):
        raise CacheError(f"{folder}: split {split!r} has {len(shards)} of {count} shards; "
                         f"missing {[shard_path(root, backbone, dataset, split, i, count).name for i in missing][:5]}")
    return [shards[i] for i in range(count)]


def open_split(root: str | os.PathLike, backbone: str, dataset: str, split: str,
               modalities: Iterable[str] | None = None) -> SplitFeatures:
    """Load and validate a split (all its shards) into memory.

    Args:
        root: feature-cache root folder.
        backbone, dataset, split: which split; any backbone name is accepted.
        modalities: embeddings to load (default: all). Each must exist.

    Raises:
        CacheError: naming the file and the problem (missing modality, bad shape, NaN, duplicate
            ids, wrong schema, mismatched dims between shards, empty split, corrupt HDF5...).
    """
    paths = split_files(root, backbone, dataset, split)
    return load_files(paths, modalities)


def check_split(root: str | os.PathLike, backbone: str, dataset: str, split: str,
                modalities: Iterable[str] | None = None) -> ShardMeta:
    """Validate a split exactly as :func:`open_split` does, without keeping it: the embeddings are
    read and checked a block at a time. Returns the split's metadata (of its first shard).

    Raises:
        CacheError: as :func:`open_split`.
    """
    return check_files(split_files(root, backbone, dataset, split), modalities)


def check_files(paths: Sequence[Path], modalities: Iterable[str] | None = None) -> ShardMeta:
    """:func:`check_split` of one split stored in ``paths`` (as :func:`load_files` loads it)."""
    return _read_files(paths, modalities, keep=False).meta


def load_files(paths: Sequence[Path], modalities: Iterable[str] | None = None) -> SplitFeatures:
    """Load one split stored in ``paths`` (one file or its shards, in order)."""
    return _read_files(paths, modalities, keep=True)


def _read_files(paths: Sequence[Path], modalities: Iterable[str] | None, *, keep: bool) -> SplitFeatures:
    """Read and validate one split; with ``keep=False`` the embeddings are checked block by block
    and left out of the result (``emb`` is empty)."""
    ids, labels, texts = [], [], []
    embs: dict[str, list[np.ndarray]] = {}
    meta0: ShardMeta | None = None
    classes = None
    wanted = list(modalities) if modalities is not None else None
    for path in paths:
        with FeatureShard(path) as shard:
            meta = shard.meta
            if meta0 is None:
                meta0 = meta
                wanted = wanted if wanted is not None else list(meta.modalities)
            else:
                for key in ("backbone", "dataset", "split", "dim", "normalized"):
                    if getattr(meta, key) != getattr(meta0, key):
                        raise CacheError(f"{path}: {key}={getattr(meta, key)!r} differs from "
                                         f"{paths[0].name} ({getattr(meta0, key)!r})")
                if set(meta.modalities) != set(meta0.modalities):
                    raise CacheError(f"{path}: modalities {list(meta.modalities)} differ from "
                                     f"{paths[0].name} ({list(meta0.modalities)})")
            for m in wanted:
                if m not in meta.modalities:
                    raise CacheError(f"{path}: has no modality {m!r} (it holds {list(meta.modalities)})")
            n = len(shard)
            if n == 0:
                raise CacheError(f"{path}: the split is empty (0 rows)")
            ids.append(shard.ids)
            labels.append(shard.labels)
            if len(labels[-1]) != n:
                raise CacheError(f"{path}: /labels has {len(labels[-1])} rows, /ids has {n}")
            t = shard.text
            texts.append(t)
            for m in wanted:
                if not keep:
                    shard.check_values(m)
                    continue
                x = shard.load(m)
                check_embeddings(x, f"{path}: /emb/{m}", meta.normalized)
                embs.setdefault(m, []).append(x)
            c = shard.classes()
            if c is not None and classes is None:
                classes = c
    assert meta0 is not None
    all_ids = np.concatenate(ids) if len(ids) > 1 else ids[0]
    uniq = len(set(all_ids.tolist()))
    if uniq != len(all_ids):
        raise CacheError(f"{paths[0]}: ids are not unique across the split "
                         f"({len(all_ids) - uniq} duplicates, e.g. {_first_duplicate(all_ids)!r})")
    text = None
    if all(t is not None for t in texts):
        text = np.concatenate(texts) if len(texts) > 1 else texts[0]
    class_names = class_emb = None
    if classes is not None:
        class_names, protos = classes
        class_emb = protos.get("text")
        if class_emb is not None:
            check_embeddings(class_emb, f"{paths[0]}: /classes/emb/text", meta0.normalized)
    return SplitFeatures(
        meta=meta0, paths=list(paths), ids=all_ids,
        labels=np.concatenate(labels) if len(labels) > 1 else labels[0],
        emb={m: (np.concatenate(v) if len(v) > 1 else v[0]) for m, v in embs.items()},
        text=text, class_names=class_names, class_emb=class_emb,
    )


@dataclass(frozen=True)
class CacheEntry:
    """One split found in a cache folder."""

    backbone: str
    dataset: str
    split: str
    files: tuple[Path, ...]


def list_cache(root: str | os.PathLike) -> list[CacheEntry]:
    """Every split under a cache root, sorted by (backbone, dataset, split). Reads no data."""
    root = Path(root)
    found: dict[tuple[str, str, str], list[Path]] = {}
    for path in sorted(root.glob("*/*/*.h5")):
        backbone, dataset = path.parent.parent.name, path.parent.name
        m = _SHARD_RE.match(path.name)
        split = m.group("split") if m else path.stem
        found.setdefault((backbone, dataset, split), []).append(path)
    return [CacheEntry(b, d, s, tuple(files)) for (b, d, s), files in sorted(found.items())]


def describe_shard(path: str | os.PathLike) -> str:
    """What ``cmcl info FILE`` prints: metadata, sizes, extra attributes, and a full check."""
    with FeatureShard(path) as shard:
        m = shard.meta
        cls = shard.classes()
        lines = [f"{path}",
                 f"  schema cmcl.features/1  backbone {m.backbone}  dataset {m.dataset}  split {m.split}",
                 f"  rows {len(shard)}  dim {m.dim}  modalities {', '.join(m.modalities)}  normalized {m.normalized}",
                 f"  classes {len(cls[0]) if cls else 0}  text {'yes' if shard.text is not None else 'no'}  "
                 f"checkpoint {m.checkpoint or '-'}  created {m.created_utc}  cmcl {m.cmcl_version}"]
        lines += [f"  {k}: {str(v)[:120]}" for k, v in sorted(m.extra.items())]
        shard.check()
        lines.append("  check: ok")
    return "\n".join(lines)


def describe_cache(root: str | os.PathLike) -> list[str]:
    """One line per split of the cache under ``root``: rows, dims, modalities, shard count."""
    lines = []
    for e in list_cache(root):
        rows, dims, mods = 0, set(), ()
        for f in e.files:
            with FeatureShard(f) as shard:
                rows += len(shard)
                dims.add(shard.meta.dim)
                mods = shard.meta.modalities
        lines.append(f"{e.backbone}/{e.dataset}/{e.split}: {rows} rows, dim {','.join(map(str, sorted(dims)))}, "
                     f"{', '.join(mods)}" + (f" ({len(e.files)} shards)" if len(e.files) > 1 else ""))
    return lines
