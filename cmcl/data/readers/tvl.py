"""TVL, Touch-Vision-Language (vision-text-tactile, recall).

Layout: ``tvl/tvl_dataset/ssvtp/{train,test}.csv`` and ``tvl/tvl_dataset/hct/data{1,2,3}/{train,test}.csv``,
paths in the CSVs relative to their subset folder. Subsets are read in the order ssvtp, hct/data1,
hct/data2, hct/data3. Per row: ``vision`` = ``<subset>/<url>``, ``tactile`` = ``<subset>/<tactile>``
(SSVTP test: the url with every "rgb" replaced by "tac"), ``text`` = ``name`` = the caption with
"\\r\\n" and every "." removed; ``id = vision_<subset with "/" -> "_">_<row index>``. A row whose caption
pandas reads as missing is skipped (its index is still consumed) and reported by :meth:`skipped`.
Ids repeat between train and test, as in the reference.
"""

from __future__ import annotations

from cmcl.data.readers.base import DatasetReader, Record, Skip, _Index
from cmcl.errors import DatasetError

SUBSETS = ("ssvtp", "hct/data1", "hct/data2", "hct/data3")


def clean_caption(caption: str) -> str:
    """The reference's caption cleaning: drop "\\r\\n" pairs and every period; nothing else."""
    return caption.replace("\r\n", "").replace(".", "")


class TVL(DatasetReader):
    """TVL reader."""

    name = "tvl"
    folders = ("tvl",)
    modalities = ("vision", "text", "tactile")

    def __init__(self, data_root, *, cache_dir=None) -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        base = self.root / "tvl_dataset" if (self.root / "tvl_dataset").is_dir() else self.root
        for sub in SUBSETS:
            self._require(base / sub, f"the TVL subset {sub} (tvl_dataset/{sub}/{{train,test}}.csv)")
        self._base = base

    def _index(self, split: str) -> _Index:
        import pandas as pd

        recs, skipped = [], []
        for sub in SUBSETS:
            folder = self._base / sub
            path = self._require(folder / f"{split}.csv", f"the {sub} {split} CSV")
            # pandas' default missing-value rules decide which captions are skipped, as in the reference.
            df = pd.read_csv(path, encoding="utf-8")
            missing = {"url", "caption"} - set(df.columns)
            if missing:
                raise DatasetError(f"tvl: {path} lacks the columns {sorted(missing)} (has {list(df.columns)})")
            rgb_to_tac = sub == "ssvtp" and split == "test"
            if not rgb_to_tac and "tactile" not in df.columns:
                raise DatasetError(f"tvl: {path} lacks the column 'tactile' (has {list(df.columns)})")
            prefix = "vision_" + sub.replace("/", "_")
            for i, row in enumerate(df.itertuples(index=False)):
                rid = f"{prefix}_{i}"
                if not isinstance(row.caption, str):
                    skipped.append(Skip(rid, f"caption is missing in {path.name} row {i}"))
                    continue
                tac = row.url.replace("rgb", "tac") if rgb_to_tac else row.tactile
                text = clean_caption(row.caption)
                recs.append(Record(rid, {"vision": str(folder / row.url), "text": text,
                                         "tactile": str(folder / tac)}, text))
        return _Index(recs, skipped)
