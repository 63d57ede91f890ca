"""``pairs``: a generic reader for your own paired media, listed in a manifest.

The manifest is a CSV file (a header row) or a JSON-lines file (``.jsonl``/``.json``, one object
per line). Columns:

- one column per modality, named after it (``vision``, ``audio``, ``depth``...): a media file
  path, relative to the manifest's folder (or absolute); for ``text``, the text itself;
- optional ``id`` (default: the row number, from 0), ``split`` (default: every row in
  ``default_split``), ``label`` (an integer class index, -1 for none) and ``class`` (a class
  name; its text is the zero-shot prototype, labels become positions in the sorted names).

Options (``--reader-option KEY=VALUE``): ``manifest`` (the file; relative paths are taken below
``--data-root``), ``dataset`` (the name in the cache, default ``pairs``), ``modalities``
(comma-separated subset of the columns, default every modality column), ``default_split``
(default ``train``) and ``prompt`` (a template for class prototypes, e.g. ``"a photo of a {}"``;
default the class name itself).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cmcl.data.readers.base import NO_LABEL, DatasetReader, Record, _Index
from cmcl.errors import DatasetError
from cmcl.types import check_modality_name

RESERVED = ("id", "split", "label", "class")


class Pairs(DatasetReader):
    """Reader of a manifest of paired media (see the module docstring)."""

    name = "pairs"
    folders = ()
    modalities = ()

    def __init__(self, data_root, *, cache_dir=None, manifest: str | None = None, dataset: str = "pairs",
                 modalities: str | None = None, default_split: str = "train", prompt: str | None = None) -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        if not manifest:
            raise DatasetError("pairs: give the manifest with --reader-option manifest=FILE (CSV or JSONL)")
        path = Path(manifest).expanduser()
        self.manifest = path if path.is_absolute() else self.data_root / path
        if not self.manifest.is_file():
            raise DatasetError(f"pairs: manifest {self.manifest} does not exist")
        if not dataset or "/" in dataset or dataset.startswith("."):
            raise DatasetError(f"pairs: invalid dataset name {dataset!r}")
        self.name = dataset
        self.prompt = prompt
        self.default_split = default_split
        rows = self._read()
        columns = list(dict.fromkeys(k for r in rows for k in r))
        found = [c for c in columns if c not in RESERVED]
        for c in found:
            try:
                check_modality_name(c)
            except ValueError as exc:
                raise DatasetError(f"{self.manifest}: column {c!r}: {exc} (or one of {', '.join(RESERVED)})") from None
        wanted = [m.strip() for m in modalities.split(",") if m.strip()] if modalities else found
        missing = [m for m in wanted if m not in found]
        if missing or not wanted:
            raise DatasetError(f"{self.manifest}: no column for modality {missing or 'any'} (columns: {columns})")
        self.modalities = tuple(wanted)
        self.has_classes = "class" in columns
        self._rows = rows
        splits = {r.get("split") or default_split for r in rows}
        self.splits = tuple(sorted(splits))

    def _read(self) -> list[dict[str, str]]:
        path = self.manifest
        try:
            if path.suffix.lower() in (".jsonl", ".json"):
                rows = []
                for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise DatasetError(f"{path}: line {i} is not a JSON object")
                    rows.append({str(k): ("" if v is None else str(v)) for k, v in obj.items()})
            else:
                with open(path, newline="", encoding="utf-8-sig") as fh:
                    rows = [{k: (v or "") for k, v in r.items() if k is not None} for r in csv.DictReader(fh)]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
            raise DatasetError(f"{path}: cannot read the manifest ({exc})") from None
        if not rows:
            raise DatasetError(f"{path}: the manifest has no rows")
        return rows

    def _index(self, split: str) -> _Index:
        base = self.manifest.parent
        records = []
        for i, row in enumerate(self._rows):
            if (row.get("split") or self.default_split) != split:
                continue
            rid = row.get("id") or str(i)
            where = f"{self.manifest}: row {i + 1} (id {rid!r})"
            data = {}
            for m in self.modalities:
                value = row.get(m, "")
                if not value:
                    raise DatasetError(f"{where}: empty {m!r}")
                data[m] = value if m == "text" else str((base / value) if not Path(value).is_absolute() else Path(value))
            label = -1
            if row.get("label", "") != "":
                try:
                    label = int(row["label"])
                except ValueError:
                    raise DatasetError(f"{where}: label {row['label']!r} is not an integer") from None
                if label < -1:
                    raise DatasetError(f"{where}: label {label} is below -1")
            name = NO_LABEL
            if self.has_classes:
                name = row.get("class", "")
                if not name:
                    raise DatasetError(f"{where}: empty 'class' (every row needs one when the column exists)")
            records.append(Record(rid, data, name, label))
        return _Index(records)

    def _class_text(self, name: str) -> str:
        return self.prompt.format(name) if self.prompt else name
