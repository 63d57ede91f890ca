"""VGGSound-S (text-audio-video, recall and zero-shot accuracy): a 10,000 / 2,000 clip subset.

Layout: ``vggsound/vggsound.csv`` (no header: YouTube id, start second, label, split) and the clips
``vggsound/scratch/shared/beegfs/hchen/train_data/VGGSound_final/video/<ytid>_<start:06d>.mp4`` (the
path the ``Loie/VGGSound`` tars extract to; a flat ``vggsound/video/`` is accepted too). Audio is the
sibling ``audio/<id>.mp3`` when present; otherwise :meth:`VGGSoundS.prepare` extracts a WAV track
with ffmpeg into ``cache_dir`` (the reference writes mp3s into the dataset tree).

Which clips form the subset (``select``):

* ``"manifest"``: the ids frozen in a manifest file (see :func:`load_manifest`); a clip of the
  manifest that is missing on disk is a failure of the run, never silently replaced.
* ``"available"``: the first ``cap`` rows of the split, in CSV order, whose mp4 exists (10,000 train,
  2,000 test). Results then depend on which clips a copy holds; freeze them with
  :func:`freeze_manifest`.
* ``"reference"``: the reference's own rule: its off-by-one cap (up to 10,001 / 2,001 clips) and
  rows whose data-tree mp3 is missing dropped after being counted.

``id = <ytid>_<start zero-padded to 6 digits>``, ``text`` = ``name`` = the label verbatim.

No frozen manifest of the paper's subset ships with this version (it can only be produced from a
copy of the clips the authors used); the format and the tools to write and read one are here.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import logging
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from cmcl.data.readers.base import DatasetReader, Record, Skip, _Index
from cmcl.errors import DatasetError

log = logging.getLogger(__name__)

VIDEO_SUBDIR = "scratch/shared/beegfs/hchen/train_data/VGGSound_final/video"
CAPS = {"train": 10_000, "test": 2_000}
MANIFEST_HEADER = "# cmcl vggsound_s manifest, format 1"
#: Name of the manifest looked up in the package (``cmcl/data/manifests/``) when none is given.
SHIPPED_MANIFEST = "vggsound_s.csv"


@dataclass(frozen=True)
class _Row:
    ytid: str
    start: int
    label: str
    split: str

    @property
    def id(self) -> str:
        """``<ytid>_<start:06d>``, the reference id."""
        return f"{self.ytid}_{self.start:06d}"


def read_csv(path: Path) -> list[_Row]:
    """Rows of ``vggsound.csv`` in file order (a header line, if any, is ignored)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, fields in enumerate(csv.reader(fh)):
            if not fields:
                continue
            if len(fields) != 4:
                raise DatasetError(f"vggsound_s: {path} line {i + 1} has {len(fields)} fields, expected 4 "
                                   f"(youtube id, start, label, split)")
            ytid, start, label, split = fields
            try:
                start_s = int(start)
            except ValueError:
                if i == 0:
                    continue  # header
                raise DatasetError(f"vggsound_s: {path} line {i + 1}: start {start!r} is not an integer") from None
            rows.append(_Row(ytid, start_s, label, split.strip()))
    return rows


def load_manifest(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a frozen subset: ``{"train": [ids], "test": [ids]}``.

    Format: UTF-8 text; lines starting with ``#`` are comments (the first is :data:`MANIFEST_HEADER`,
    the others record how the subset was chosen); then a CSV with header ``split,id`` and one row
    per clip, ``id`` as ``<ytid>_<start:06d>``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"vggsound_s: manifest {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != MANIFEST_HEADER:
        raise DatasetError(f"vggsound_s: {path} does not start with {MANIFEST_HEADER!r}")
    body = [ln for ln in lines if ln and not ln.startswith("#")]
    reader = csv.DictReader(body)
    if reader.fieldnames != ["split", "id"]:
        raise DatasetError(f"vggsound_s: {path} must have the CSV header 'split,id', got {reader.fieldnames}")
    out: dict[str, list[str]] = {"train": [], "test": []}
    for row in reader:
        if row["split"] not in out:
            raise DatasetError(f"vggsound_s: {path}: unknown split {row['split']!r} for id {row['id']!r}")
        out[row["split"]].append(row["id"])
    return out


def shipped_manifest() -> Path | None:
    """The manifest shipped in the package, or ``None`` when this version ships none."""
    ref = resources.files("cmcl.data").joinpath("manifests", SHIPPED_MANIFEST)
    return Path(str(ref)) if ref.is_file() else None


class VGGSoundS(DatasetReader):
    """VGGSound-S reader.

    Args:
        data_root: folder holding ``vggsound/`` (or that folder itself).
        cache_dir: where :meth:`prepare` writes extracted audio tracks.
        select: ``"manifest"``, ``"available"`` or ``"reference"`` (module docstring). Default:
            ``"manifest"`` when a manifest is given or shipped, else ``"available"``.
        manifest: a frozen manifest file (implies ``select="manifest"``).
        cap_train, cap_test: subset sizes for ``available``/``reference``.
        ffmpeg: the ffmpeg executable used by :meth:`prepare`.
    """

    name = "vggsound_s"
    folders = ("vggsound",)
    modalities = ("text", "audio", "video")
    has_classes = True

    def __init__(self, data_root, *, cache_dir=None, select: str | None = None,
                 manifest: str | os.PathLike | None = None, cap_train: int = CAPS["train"],
                 cap_test: int = CAPS["test"], ffmpeg: str = "ffmpeg") -> None:
        super().__init__(data_root, cache_dir=cache_dir)
        self._csv = self._require(self.root / "vggsound.csv", "the clip list vggsound.csv")
        video = self.root / VIDEO_SUBDIR
        self._video = video if video.is_dir() else self.root / "video"
        if not self._video.is_dir():
            raise DatasetError(f"vggsound_s: expected the clips in {video} (or {self.root / 'video'})")
        self._audio = self._video.parent / "audio"
        if manifest is None and select in (None, "manifest"):
            manifest = shipped_manifest()
        if select is None:
            select = "manifest" if manifest is not None else "available"
        if select not in ("manifest", "available", "reference"):
            raise DatasetError(f"vggsound_s: select must be manifest, available or reference, got {select!r}")
        if select == "manifest" and manifest is None:
            raise DatasetError("vggsound_s: select='manifest' needs a manifest file (none ships with this version; "
                               "freeze one with cmcl.data.readers.vggsound_s.freeze_manifest)")
        if select == "available" and manifest is None:
            log.warning("vggsound_s: no frozen manifest; the subset is the first %d/%d clips present in %s, "
                        "so it depends on this copy (freeze it with freeze_manifest)", cap_train, cap_test, self._video)
        self.select = select
        self.manifest = Path(manifest) if manifest is not None and select == "manifest" else None
        self.caps = {"train": int(cap_train), "test": int(cap_test)}
        self.ffmpeg = ffmpeg
        self._rows: list[_Row] | None = None

    @property
    def layout(self) -> str:
        """The layout and how the subset is chosen, e.g. ``"reference (manifest)"``."""
        return f"reference ({self.select})"

    def rows(self) -> list[_Row]:
        """``vggsound.csv`` rows in file order."""
        if self._rows is None:
            self._rows = read_csv(self._csv)
        return self._rows

    def _video_path(self, rid: str) -> Path:
        return self._video / f"{rid}.mp4"

    def _audio_path(self, rid: str) -> Path:
        mp3 = self._audio / f"{rid}.mp3"
        if mp3.is_file() or self.cache_dir is None:
            return mp3
        return self.cache_dir / "vggsound_s" / "audio" / f"{rid}.wav"

    def _record(self, row: _Row) -> Record:
        return Record(row.id, {"text": row.label, "audio": str(self._audio_path(row.id)),
                               "video": str(self._video_path(row.id))}, row.label)

    def _index(self, split: str) -> _Index:
        rows = [r for r in self.rows() if r.split == split]
        if self.select == "manifest":
            by_id = {r.id: r for r in rows}
            ids = load_manifest(self.manifest)[split]
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                raise DatasetError(f"vggsound_s: {len(unknown)} {split} ids of {self.manifest} are not "
                                   f"{split} rows of {self._csv}, e.g. {unknown[:3]}")
            return _Index([self._record(by_id[i]) for i in ids])
        cap = self.caps[split]
        recs, skipped, counted = [], [], 0
        for row in rows:
            if not self._video_path(row.id).is_file():
                skipped.append(Skip(row.id, "video missing"))
                continue
            if self.select == "reference":
                # The reference checks "counter > cap" before counting, so it keeps cap + 1 clips,
                # and drops a clip whose mp3 is missing only after counting it.
                if counted > cap:
                    break
                counted += 1
                if not (self._audio / f"{row.id}.mp3").is_file():
                    skipped.append(Skip(row.id, "audio (mp3) missing"))
                    continue
            elif counted >= cap:
                break
            else:
                counted += 1
            recs.append(self._record(row))
        return _Index(recs, skipped)

    def prepare(self, records: Sequence[Record], workers: int = 4) -> None:
        """Extract the audio track (WAV, 44.1 kHz, stereo) of clips with no mp3, into ``cache_dir``."""
        todo = [r for r in records
                if not os.path.exists(r.data["audio"]) and os.path.exists(r.data["video"])
                and self.cache_dir is not None and Path(r.data["audio"]).is_relative_to(self.cache_dir)]
        if not todo:
            return
        exe = shutil.which(self.ffmpeg)
        if exe is None:
            raise DatasetError(f"vggsound_s: {len(todo)} clips have no mp3 in {self._audio} and ffmpeg "
                               f"({self.ffmpeg!r}) was not found to extract their audio; install ffmpeg")
        Path(todo[0].data["audio"]).parent.mkdir(parents=True, exist_ok=True)

        def one(rec: Record) -> None:
            out = Path(rec.data["audio"])
            tmp = out.with_name(out.stem + ".tmp.wav")
            proc = subprocess.run([exe, "-nostdin", "-loglevel", "error", "-y", "-i", rec.data["video"],
                                   "-vn", "-ac", "2", "-ar", "44100", "-f", "wav", str(tmp)],
                                  capture_output=True, text=True)
            if proc.returncode == 0 and tmp.is_file():
                os.replace(tmp, out)
            else:
                tmp.unlink(missing_ok=True)
                log.warning("vggsound_s: ffmpeg failed on %s: %s", rec.data["video"], proc.stderr.strip()[-300:])

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(one, todo))


def freeze_manifest(data_root: str | os.PathLike, out: str | os.PathLike, *, select: str = "available",
                    cap_train: int = CAPS["train"], cap_test: int = CAPS["test"]) -> Path:
    """Write the subset a copy of VGGSound yields now as a manifest file; returns its path."""
    reader = VGGSoundS(data_root, select=select, manifest=None, cap_train=cap_train, cap_test=cap_test)
    digest = hashlib.sha256(reader._csv.read_bytes()).hexdigest()[:16]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [MANIFEST_HEADER,
             f"# select={select} cap_train={cap_train} cap_test={cap_test} vggsound.csv sha256[:16]={digest} "
             f"frozen_utc={now}", "split,id"]
    for split in ("train", "test"):
        lines += [f"{split},{r.id}" for r in reader.records(split)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
