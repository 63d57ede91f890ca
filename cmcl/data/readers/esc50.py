"""ESC-50 (text-audio, recall and zero-shot accuracy).

Reference layout (``ashraq/esc50`` on Hugging Face): ``esc50/data/train-00000-of-00002-<hash>.parquet``
and ``train-00001-of-00002-<hash>.parquet`` (the ``refs/convert/parquet`` branch's
``default/train/0000.parquet``/``0001.parquet`` are accepted too). Train = every row of the first
file plus rows 0-599 of the second; test = rows 600+ of the second (1,600 / 400). The WAV bytes live
in the parquet ``audio`` column; :meth:`ESC50.prepare` writes them below ``cache_dir`` (never into
the dataset tree, unlike the reference).

Official layout (``karolpiczak/ESC-50``): ``esc50/{ESC-50-master/,}audio/*.wav`` with
``meta/esc50.csv``; train = folds 1-4, test = fold 5, which is the same split as the parquet rule
(the parquet files hold ``esc50.csv`` in order, so their last 400 rows are fold 5).

Per clip: ``id = filename`` (with ``.wav``), ``name`` = ``text`` = ``category`` verbatim
("chirping_birds").
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cmcl.data.readers.base import DatasetReader, Record, _Index
from cmcl.errors import DatasetError

#: Rows of the second parquet file that still belong to train (the reference's cutoff).
SECOND_FILE_TRAIN_ROWS = 600
_META_COLUMNS = ["filename", "fold", "target", "category"]


def _read_parquet(path: Path, columns: list[str]):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("esc50: reading the parquet layout needs pyarrow (pip install 'cmcl[datasets]')") from None
    try:
        return pq.read_table(path, columns=columns).to_pandas()
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
        raise DatasetError(f"esc50: cannot read {path}: {exc}") from None


class ESC50(DatasetReader):
    """ESC-50 reader (parquet or official layout)."""

    name = "esc50"
    folders = ("esc50", "ESC-50-master")
    modalities = ("text", "audio")
    has_classes = True

    def __init__(self, data_root, *, cache_dir=None) -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        self._parquets = self._find_parquets()
        if self._parquets:
            self._layout = "reference"
            return
        for base in (self.root, self.root / "ESC-50-master"):
            if (base / "meta" / "esc50.csv").is_file():
                self._official = base
                self._layout = "official"
                self._require(base / "audio", "the official audio folder")
                return
        raise DatasetError(f"esc50: expected the parquet files {self.root}/data/train-0000{{0,1}}-of-00002-*.parquet "
                           f"or the official {self.root}/meta/esc50.csv with audio/*.wav (see docs/datasets.md)")

    @property
    def layout(self) -> str:
        """``"reference"`` or ``"official"``, whichever was found."""
        return self._layout

    def _find_parquets(self) -> list[Path]:
        data = self.root / "data"
        first = sorted(data.glob("train-00000-of-00002*.parquet"))
        second = sorted(data.glob("train-00001-of-00002*.parquet"))
        if len(first) > 1 or len(second) > 1:
            names = [p.name for p in first + second]
            raise DatasetError(f"esc50: several parquet files for one shard in {data}: {names}")
        if first and second:
            return [first[0], second[0]]
        if first or second:
            missing = "train-00001-of-00002-*.parquet" if first else "train-00000-of-00002-*.parquet"
            raise DatasetError(f"esc50: expected {data / missing} next to {(first or second)[0].name}")
        conv = self.root / "default" / "train"
        if (conv / "0000.parquet").is_file():
            return [conv / "0000.parquet", self._require(conv / "0001.parquet", "the second parquet file")]
        return []

    def _audio_cache(self) -> Path:
        stamp = "".join(f"{p.name}:{p.stat().st_size};" for p in self._parquets)
        key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
        return self._need_cache_dir("write the WAV bytes stored in the parquet files") / f"esc50-{key}" / "audio"

    def _index(self, split: str) -> _Index:
        if self._layout == "official":
            import pandas as pd

            meta = pd.read_csv(self._official / "meta" / "esc50.csv", encoding="utf-8")
            keep = meta["fold"] == 5 if split == "test" else meta["fold"] != 5
            audio = self._official / "audio"
            return _Index([Record(r.filename, {"text": r.category, "audio": str(audio / r.filename)}, r.category)
                           for r in meta[keep].itertuples()])
        rows = []
        for k, path in enumerate(self._parquets):
            df = _read_parquet(path, _META_COLUMNS)
            for pos, (fname, cat) in enumerate(zip(df["filename"], df["category"])):
                in_train = k == 0 or pos < SECOND_FILE_TRAIN_ROWS
                if in_train == (split == "train"):
                    rows.append((fname, cat))
        # Paths are known before prepare() writes the files, so indexing stays cheap and pure.
        audio = self._audio_cache() if self.cache_dir is not None else Path("<cache_dir>") / "esc50" / "audio"
        return _Index([Record(f, {"text": c, "audio": str(audio / f)}, c) for f, c in rows])

    def prepare(self, records) -> None:
        """Write the WAV bytes of ``records`` from the parquet files into the cache (parquet layout only)."""
        if self._layout != "reference":
            return
        out = self._audio_cache()
        want = {os.path.basename(r.data["audio"]) for r in records if not os.path.exists(r.data["audio"])}
        if not want:
            return
        out.mkdir(parents=True, exist_ok=True)
        for path in self._parquets:
            df = _read_parquet(path, ["filename", "audio"])
            for fname, audio in zip(df["filename"], df["audio"]):
                if fname not in want:
                    continue
                blob = audio.get("bytes") if isinstance(audio, dict) else None
                if not blob:
                    continue  # left missing: the engine reports it as a failure
                tmp = out / (fname + ".tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, out / fname)
