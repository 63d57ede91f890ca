"""UCF101 (text-video, zero-shot accuracy).

Reference layout (the ``NoahMartinezXiang/UCF101`` zip): ``ucf101/UCF101/{train,val,test}/<Class>/<clip>.avi``;
train reads ``train``, test reads ``test`` and ``val`` together. Official layout (CRCV):
``ucf101/UCF-101/<Class>/<clip>.avi`` with ``ucf101/ucfTrainTestlist/{trainlist,testlist}0K.txt``,
split ``K`` (default 1).

Per clip: ``id = <Class>_<clip stem>``, ``name = <Class>`` (CamelCase folder), ``text`` = the folder
name split at capitals and lower-cased ("ApplyEyeMakeup" -> "apply eye makeup").
"""

from __future__ import annotations

from pathlib import Path

from cmcl.data.readers.base import DatasetReader, Record, _Index, split_camel_case
from cmcl.errors import DatasetError


class UCF101(DatasetReader):
    """UCF101 reader; ``split_set`` picks the official train/test list (1-3) in the official layout."""

    name = "ucf101"
    folders = ("ucf101",)
    modalities = ("text", "video")
    has_classes = True

    def __init__(self, data_root, *, cache_dir=None, split_set: int = 1) -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        if split_set not in (1, 2, 3):
            raise DatasetError(f"ucf101: split_set must be 1, 2 or 3, got {split_set}")
        self.split_set = split_set
        ref = self.root / "UCF101"
        off = self.root / "UCF-101"
        if (ref / "train").is_dir():
            self._layout = "reference"
        elif off.is_dir():
            self._layout = "official"
            self._require(self.root / "ucfTrainTestlist", "the official split lists (ucfTrainTestlist/)")
        else:
            raise DatasetError(f"ucf101: expected the reference layout {ref}/{{train,val,test}}/<Class>/*.avi "
                               f"or the official layout {off}/<Class>/*.avi (see docs/datasets.md)")

    @property
    def layout(self) -> str:
        """``"reference"`` or ``"official"``, whichever was found."""
        return self._layout

    def _record(self, cls: str, path: Path) -> Record:
        return Record(f"{cls}_{path.stem}", {"text": split_camel_case(cls), "video": str(path)}, cls)

    def _index(self, split: str) -> _Index:
        if self._layout == "official":
            return self._index_official(split)
        base = self.root / "UCF101"
        folders = ["train"] if split == "train" else ["test", "val"]
        recs = []
        for i, folder in enumerate(folders):
            d = base / folder
            if not d.is_dir():
                if i == 0:
                    self._require(d, f"the {split} folder")
                continue  # a missing val folder only means nothing to merge
            for cls_dir in sorted(p for p in d.iterdir() if p.is_dir()):
                for f in sorted(cls_dir.iterdir()):
                    if f.name.endswith(".avi"):
                        recs.append(self._record(cls_dir.name, f))
        return _Index(recs)

    def _index_official(self, split: str) -> _Index:
        lists = self.root / "ucfTrainTestlist"
        lst = self._require(lists / f"{split}list0{self.split_set}.txt", f"the official {split} list")
        recs = []
        for line in lst.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            rel = line.split()[0]  # trainlist lines carry a 1-based class index after the path
            cls, fname = rel.split("/", 1)
            recs.append(self._record(cls, self.root / "UCF-101" / cls / fname))
        return _Index(recs)

    def _class_text(self, name: str) -> str:
        return split_camel_case(name)
