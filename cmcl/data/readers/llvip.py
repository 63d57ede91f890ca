"""LLVIP (vision-thermal, recall).

Layout (official = reference): ``llvip/LLVIP/visible/{train,test}/<NNNNNN>.jpg`` and the registered
partner ``llvip/LLVIP/infrared/{train,test}/<NNNNNN>.jpg``. ``id`` = file name up to its first ".".
A visible image without an infrared partner is kept in the records; the extraction engine reports
it as a failure with the missing path (the reference would only fail when encoding).
"""

from __future__ import annotations

from cmcl.data.readers.base import NO_LABEL, DatasetReader, Record, _Index


class LLVIP(DatasetReader):
    """LLVIP reader."""

    name = "llvip"
    folders = ("llvip",)
    modalities = ("vision", "thermal")

    def __init__(self, data_root, *, cache_dir=None) -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        base = self.root / "LLVIP" if (self.root / "LLVIP").is_dir() else self.root
        self._base = base
        self._require(base / "visible", "the visible images (LLVIP/visible/{train,test}/*.jpg)")
        self._require(base / "infrared", "the infrared images (LLVIP/infrared/{train,test}/*.jpg)")

    def _index(self, split: str) -> _Index:
        vis = self._require(self._base / "visible" / split, f"the {split} visible images")
        ir = self._base / "infrared" / split
        recs = []
        for f in sorted(vis.iterdir()):
            if f.name.endswith("jpg"):
                recs.append(Record(f.name.split(".")[0], {"vision": str(f), "thermal": str(ir / f.name)}, NO_LABEL))
        return _Index(recs)
