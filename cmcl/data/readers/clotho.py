"""Clotho (text-audio, recall).

Layout (reference; the official archives extract the same way):
``clotho/clotho_captions_{development,evaluation}.csv`` and the WAVs in
``clotho/{development,evaluation}/<file_name>``. Train = development, test = evaluation (the
validation split of v2 is unused). One sample per CSV row, ``text`` = ``caption_1`` (the other four
captions are not used, as in the reference), ``name`` = "no label".

Deviation: ``id`` is the file name without its extension (the reference cuts at the *first* dot,
which truncates names such as ``"rain.on.roof.wav"`` and can collide); ids are checked unique.
"""

from __future__ import annotations

import csv
from pathlib import PurePath

from cmcl.data.readers.base import NO_LABEL, DatasetReader, Record, _Index
from cmcl.errors import DatasetError

_FOLDER = {"train": "development", "test": "evaluation"}


class Clotho(DatasetReader):
    """Clotho reader (v1 or v2.x; the version on disk decides the development size)."""

    name = "clotho"
    folders = ("clotho",)
    modalities = ("text", "audio")

    def __init__(self, data_root, *, cache_dir=None) -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        for folder in _FOLDER.values():
            self._require(self.root / f"clotho_captions_{folder}.csv", f"the {folder} captions CSV")

    def _index(self, split: str) -> _Index:
        folder = _FOLDER[split]
        path = self.root / f"clotho_captions_{folder}.csv"
        audio = self._require(self.root / folder, f"the {folder} audio folder")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not {"file_name", "caption_1"} <= set(rows[0]):
            raise DatasetError(f"clotho: {path} lacks the columns file_name and caption_1 (has {list(rows[0])})")
        recs = [Record(PurePath(r["file_name"]).stem,
                       {"text": r["caption_1"], "audio": str(audio / r["file_name"])}, NO_LABEL)
                for r in rows]
        return _Index(recs)
