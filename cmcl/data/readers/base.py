"""The dataset-reader contract shared by the seven CMCL readers.

A reader indexes one dataset on disk and returns, for a split, the list of :class:`Record` s the
reference code would pair, with its id, split and text logic (``docs/datasets.md`` lists every
deviation). Readers are *pure*: they never write into the dataset tree. Work that needs files the
tree does not hold (ESC-50's WAV bytes inside parquet, VGGSound audio tracks inside mp4s) happens in
:meth:`DatasetReader.prepare`, which writes only below the ``cache_dir`` it is given.

Records come sorted by id, so two calls (or two machines) see the same order, and labels are the
position of the record's class name in the sorted union of train and test names.
"""

from __future__ import annotations

import abc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Mapping, Sequence

from cmcl.errors import DatasetError

#: Class name of samples that have none (recall-only datasets), as in the reference code.
NO_LABEL = "no label"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Record:
    """One paired sample.

    Attributes:
        id: the reference id, unique within its split (TVL reuses ids across splits).
        data: modality -> absolute file path, or the caption itself for ``"text"``.
        name: class name (``"no label"`` for recall-only datasets; TVL: the caption).
        label: index of ``name`` in :meth:`DatasetReader.class_names`, -1 when the dataset has none.
    """

    id: str
    data: Mapping[str, str]
    name: str = NO_LABEL
    label: int = -1

    @property
    def text(self) -> str | None:
        """The caption, when the sample has one."""
        return self.data.get("text")

    def files(self) -> dict[str, str]:
        """Modality -> path for every file-backed modality."""
        return {m: v for m, v in self.data.items() if m != "text"}


@dataclass(frozen=True)
class Skip:
    """A source row the reference logic drops, with the reason (reported, never silent)."""

    id: str
    reason: str


@dataclass
class _Index:
    records: list[Record]
    skipped: list[Skip] = field(default_factory=list)


class DatasetReader(abc.ABC):
    """Index one dataset.

    Subclasses set the class attributes and implement :meth:`_index`, returning records with
    ``label=-1``; the base class sorts them, checks id uniqueness and assigns labels.

    Attributes:
        name: dataset name in the cache (``"vggsound_s"``...).
        folders: folder names tried below ``data_root`` (the reference's first), e.g. ``("nyu-d-2",)``.
        modalities: modalities embedded into the cache, in the reference order.
        has_classes: whether the dataset is scored by zero-shot accuracy (labels and prototypes).
    """

    name: ClassVar[str]
    folders: ClassVar[tuple[str, ...]]
    modalities: ClassVar[tuple[str, ...]]
    has_classes: ClassVar[bool] = False
    splits: ClassVar[tuple[str, ...]] = SPLITS

    def __init__(self, data_root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> None:
        self.data_root = Path(data_root).expanduser().absolute()
        self.cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir is not None else None
        self.root = self._find_root()
        self._cache: dict[str, _Index] = {}
        self._classes: list[str] | None = None

    # -------------------------------------------------------------------------- layout helpers
    def _find_root(self) -> Path:
        """The dataset folder: ``data_root/<folder>`` for a known folder name, else ``data_root``."""
        for folder in self.folders:
            if (self.data_root / folder).is_dir():
                return self.data_root / folder
        if not self.data_root.is_dir():
            raise DatasetError(f"{self.name}: data root {self.data_root} does not exist")
        return self.data_root

    def _require(self, path: Path, what: str) -> Path:
        """Return ``path`` if it exists, else fail naming the expected path."""
        if not path.exists():
            raise DatasetError(f"{self.name}: expected {what} at {path} (see docs/datasets.md, layout of {self.name})")
        return path

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DatasetError(f"{self.name}: unknown split {split!r}; choose from {list(self.splits)}")

    # -------------------------------------------------------------------------- public API
    @abc.abstractmethod
    def _index(self, split: str) -> _Index:
        """Read the split's metadata; records in any order, labels unset."""

    @property
    def layout(self) -> str:
        """Name of the detected on-disk layout (``"reference"`` or ``"official"``)."""
        return "reference"

    def _indexed(self, split: str) -> _Index:
        self._check_split(split)
        if split not in self._cache:
            idx = self._index(split)
            recs = sorted(idx.records, key=lambda r: r.id)
            for a, b in zip(recs, recs[1:]):
                if a.id == b.id:
                    raise DatasetError(f"{self.name}: id {a.id!r} occurs twice in split {split!r} "
                                       f"({dict(a.data)} and {dict(b.data)})")
            self._cache[split] = _Index(recs, sorted(idx.skipped, key=lambda s: s.id))
        return self._cache[split]

    def records(self, split: str) -> list[Record]:
        """The split's records sorted by id, labels assigned (or -1)."""
        recs = self._indexed(split).records
        if not self.has_classes:
            return list(recs)
        pos = {n: i for i, n in enumerate(self.class_names())}
        return [Record(r.id, r.data, r.name, pos[r.name]) for r in recs]

    def skipped(self, split: str) -> list[Skip]:
        """Rows of the split's source metadata that the reference logic drops, with reasons."""
        return list(self._indexed(split).skipped)

    def class_names(self) -> list[str]:
        """Sorted union of class names over every split (empty for recall-only datasets)."""
        if not self.has_classes:
            return []
        if self._classes is None:
            self._classes = sorted({r.name for s in self.splits for r in self._indexed(s).records})
        return list(self._classes)

    def class_texts(self) -> list[str]:
        """The text encoded as each class's zero-shot prototype, aligned with :meth:`class_names`.

        Every sample of a class carries the same caption in the three accuracy datasets, so the
        prototype is that caption (the reference's "first sample of the class" rule, without the
        lookup). Subclasses whose caption differs from the name override :meth:`_class_text`.
        """
        return [self._class_text(n) for n in self.class_names()]

    def _class_text(self, name: str) -> str:
        return name

    def prepare(self, records: Sequence[Record]) -> None:
        """Create any derived media the records point to (below ``cache_dir``); default: nothing."""

    def missing_files(self, records: Iterable[Record]) -> list[tuple[str, str, str]]:
        """``(id, modality, path)`` for every referenced file that does not exist."""
        out = []
        for r in records:
            for m, p in r.files().items():
                if not os.path.exists(p):
                    out.append((r.id, m, p))
        return out

    def _need_cache_dir(self, why: str) -> Path:
        if self.cache_dir is None:
            raise DatasetError(f"{self.name}: a cache_dir is needed to {why} (readers never write into {self.root})")
        return self.cache_dir


def fingerprint(records: Sequence[Record]) -> str:
    """A short hash of ids, class names, labels and captions (not file paths).

    Tells whether a resumed or repeated run sees the same samples; moving the dataset folder, or
    reading another layout of the same dataset, keeps it.
    """
    h = hashlib.sha256()
    for r in records:
        for part in (r.id, r.name, str(r.label), r.text if r.text is not None else "\x00"):
            h.update(part.encode())
            h.update(b"\x1f")
        h.update(b"\n")
    return h.hexdigest()[:16]


def split_camel_case(name: str) -> str:
    """``"ApplyEyeMakeup"`` -> ``"apply eye makeup"``: a space before each capital, lower-cased, trimmed."""
    out = []
    for ch in name:
        if ch.isupper():
            out.append(" ")
        out.append(ch)
    return "".join(out).lower().strip()
