"""NYUDv2 (vision-depth, recall).

Reference layout: ``nyu-d-2/raw_data/{train,val}/<scene folder>/<sample dir>/{rgb,depth}.png``; train
reads ``train``, test reads ``val``. ``id = <scene folder>_<sample dir>``; the caption is the scene
folder's text before its first "_" ("living_room_0001" -> "living"), stored but not embedded (the
protocol pairs vision with depth). The official Hugging Face tars of fast-depth HDF5 frames are
turned into this layout by :func:`convert_official` (depth is quantised to 8 bits, see there).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from cmcl.data.readers.base import NO_LABEL, DatasetReader, Record, _Index
from cmcl.errors import DatasetError

#: Depth (metres) mapped to 255 by :func:`convert_official`; NYUDv2's Kinect range ends near 10 m.
DEPTH_MAX_METRES = 10.0


class NYUDv2(DatasetReader):
    """NYUDv2 reader (reference ``raw_data`` layout)."""

    name = "nyudv2"
    folders = ("nyu-d-2", "nyudv2")
    modalities = ("vision", "depth")

    def __init__(self, data_root, *, cache_dir=None) -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        raw = self.root / "raw_data"
        if not raw.is_dir():
            if list((self.root / "data").glob("*.tar")):
                raise DatasetError(f"nyudv2: found the Hugging Face tars in {self.root / 'data'} but no {raw}; "
                                   f"convert them first: python -c \"from cmcl.data.readers.nyudv2 import "
                                   f"convert_official; convert_official('{self.root / 'data'}', '{raw}')\"")
            self._require(raw, "the converted layout raw_data/{train,val}/<scene>/<sample>/{rgb,depth}.png")
        self._raw = raw

    def _index(self, split: str) -> _Index:
        d = self._require(self._raw / ("train" if split == "train" else "val"), f"the {split} folder")
        recs = []
        for scene in sorted(p for p in d.iterdir() if p.is_dir()):
            label = scene.name.split("_")[0]
            for sample in sorted(p for p in scene.iterdir() if p.is_dir()):
                recs.append(Record(f"{scene.name}_{sample.name}",
                                   {"vision": str(sample / "rgb.png"), "depth": str(sample / "depth.png"),
                                    "text": label}, NO_LABEL))
        return _Index(recs)


def depth_to_png8(depth: np.ndarray, depth_max: float = DEPTH_MAX_METRES) -> np.ndarray:
    """Metres -> uint8: ``round(clip(d / depth_max, 0, 1) * 255)``; NaN becomes 0."""
    d = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0)
    return np.rint(np.clip(d / depth_max, 0.0, 1.0) * 255.0).astype(np.uint8)


def convert_official(tar_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     depth_max: float = DEPTH_MAX_METRES) -> int:
    """Convert the ``sayakpaul/nyu_depth_v2`` tars into the reference ``raw_data`` layout.

    Each member ``train/<scene>/<n>.h5`` (or ``val/official/<n>.h5``) holding ``rgb`` (3, H, W) uint8
    and ``depth`` (H, W) float32 metres becomes ``out_dir/<train|val>/<scene>/<n>/{rgb,depth}.png``;
    depth is stored as 8-bit greyscale by :func:`depth_to_png8` (the reference loaders read it that
    way). Existing sample folders are left as they are. Returns the number of samples written.
    """
    import h5py
    from PIL import Image

    tar_dir, out_dir = Path(tar_dir), Path(out_dir)
    tars = sorted(tar_dir.glob("*.tar"))
    if not tars:
        raise DatasetError(f"nyudv2: no *.tar files in {tar_dir}")
    written = 0
    for tar_path in tars:
        with tarfile.open(tar_path) as tf:
            for member in tf:
                if not (member.isfile() and member.name.endswith(".h5")):
                    continue
                parts = Path(member.name).parts
                if len(parts) < 3 or parts[-3] not in ("train", "val"):
                    raise DatasetError(f"nyudv2: unexpected member {member.name} in {tar_path} "
                                       f"(expected train/<scene>/<n>.h5 or val/official/<n>.h5)")
                dest = out_dir / parts[-3] / parts[-2] / Path(parts[-1]).stem
                if (dest / "depth.png").is_file():
                    continue
                blob = tf.extractfile(member).read()
                with h5py.File(io.BytesIO(blob), "r") as h:
                    rgb = np.asarray(h["rgb"])
                    depth = np.asarray(h["depth"])
                if rgb.ndim == 3 and rgb.shape[0] == 3:
                    rgb = rgb.transpose(1, 2, 0)
                tmp = dest.with_name(dest.name + ".tmp")
                tmp.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(tmp / "rgb.png")
                Image.fromarray(depth_to_png8(depth, depth_max)).save(tmp / "depth.png")
                os.replace(tmp, dest)
                written += 1
    return written
