"""Tiny synthetic replicas of the seven datasets' on-disk layouts (no real data anywhere).

Each ``make_<dataset>(root, ...)`` writes the layout under ``root`` and returns the golden facts
the reader tests compare against. Media are minimal but decodable: WAV through ``wave``, PNG/JPEG
through Pillow, and video as placeholder containers with a valid mp4/avi signature (enough for the
``filehash`` stand-in encoder, which checks signatures rather than decoding frames).
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import wave
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------------------------ media
def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def wav_bytes(key: str, frames: int = 400, rate: int = 8000) -> bytes:
    rng = np.random.default_rng(_seed(key))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(rng.integers(-3000, 3000, frames, dtype=np.int16).tobytes())
    return buf.getvalue()


def write_wav(path: Path, key: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(key or str(path.name)))
    return path


def write_image(path: Path, key: str | None = None, fmt: str | None = None, size: int = 8) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(_seed(key or path.name))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    Image.new("RGB", (size, size), colour).save(path, format=fmt or ("JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


def write_video(path: Path, key: str | None = None) -> Path:
    """Placeholder container: an mp4 ``ftyp`` box or an AVI RIFF header, plus a unique payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = hashlib.sha256((key or path.name).encode()).digest()
    if path.suffix == ".avi":
        head = b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"AVI "
    else:
        head = struct.pack(">I", 24) + b"ftypisom" + b"\0\0\2\0isomiso2"
    path.write_bytes(head + payload)
    return path


def write_mp3(path: Path, key: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"ID3\x04\0\0\0\0\0\0" + hashlib.sha256((key or path.name).encode()).digest())
    return path


def tree_digest(root: Path) -> str:
    """Hash of every path and file content under ``root`` (purity checks)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ UCF101
UCF_CLASSES = {"ApplyEyeMakeup": "apply eye makeup", "YoYo": "yo yo", "TaiChi": "tai chi"}


def make_ucf101(root: Path, official: bool = False) -> dict:
    """3 classes; reference: 2 train, 1 test, 1 val clip each (+ a stray .txt)."""
    base = root / "ucf101"
    expect = {"train": [], "test": []}
    for cls in UCF_CLASSES:
        clips = {"train": [(1, 1), (1, 2)], "test": [(8, 1)], "val": [(9, 1)]}
        for folder, gc in clips.items():
            for g, c in gc:
                stem = f"v_{cls}_g{g:02d}_c{c:02d}"
                expect["train" if folder == "train" else "test"].append((f"{cls}_{stem}", cls, folder, stem))
    if not official:
        for split_ids in expect.values():
            for _, cls, folder, stem in split_ids:
                write_video(base / "UCF101" / folder / cls / f"{stem}.avi")
        (base / "UCF101" / "train" / "YoYo" / "notes.txt").write_text("not a clip")
    else:
        lists = base / "ucfTrainTestlist"
        lists.mkdir(parents=True)
        names = list(UCF_CLASSES)
        (lists / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
        train_lines, test_lines = [], []
        for split, items in expect.items():
            for _, cls, _, stem in items:
                write_video(base / "UCF-101" / cls / f"{stem}.avi")
                if split == "train":
                    train_lines.append(f"{cls}/{stem}.avi {names.index(cls) + 1}\n")
                else:
                    test_lines.append(f"{cls}/{stem}.avi\n")
        (lists / "trainlist01.txt").write_text("".join(train_lines))
        (lists / "testlist01.txt").write_text("".join(test_lines))
    return {s: sorted(i for i, *_ in v) for s, v in expect.items()}


# ------------------------------------------------------------------------------------ ESC-50
ESC_NAMES = ["dog", "chirping_birds", "door_wood_knock", "crying_baby", "rain"] + [f"sound_{k:02d}" for k in range(45)]


def esc50_table():
    """2,000 rows in ``esc50.csv`` order: 5 folds x 50 classes x 8 clips, sorted by filename."""
    import pandas as pd

    rows = []
    for fold in range(1, 6):
        for target, cat in enumerate(ESC_NAMES):
            for k in range(8):
                clip = 100000 + target * 100 + k * 7 + fold
                rows.append({"filename": f"{fold}-{clip}-A-{target}.wav", "fold": fold, "target": target,
                             "category": cat, "esc10": target < 10, "src_file": clip, "take": "A"})
    return pd.DataFrame(rows).sort_values("filename", ignore_index=True)


def make_esc50(root: Path, official: bool = False) -> dict:

    table = esc50_table()
    base = root / "esc50"
    if official:
        master = base / "ESC-50-master"
        (master / "meta").mkdir(parents=True)
        table.to_csv(master / "meta" / "esc50.csv", index=False)
        for f in table["filename"]:
            write_wav(master / "audio" / f, key=f)
    else:
        (base / "data").mkdir(parents=True)
        names = ["train-00000-of-00002-2f1ab7b824ec751f.parquet", "train-00001-of-00002-27425e5c1846b494.parquet"]
        for k, name in enumerate(names):
            part = table.iloc[k * 1000:(k + 1) * 1000].reset_index(drop=True).copy()
            part["audio"] = [{"bytes": wav_bytes(f), "path": f} for f in part["filename"]]
            part.to_parquet(base / "data" / name, index=False)
    test = table.iloc[1600:]
    return {"table": table, "train": sorted(table.iloc[:1600]["filename"]), "test": sorted(test["filename"])}


# ------------------------------------------------------------------------------------ NYUDv2
NYU_TRAIN_SCENES = ("living_room_0001", "office_kitchen_0001", "basement_0001a")


def make_nyudv2(root: Path) -> dict:
    raw = root / "nyu-d-2" / "raw_data"
    expect = {"train": [], "test": []}
    for scene in NYU_TRAIN_SCENES:
        for sample in ("00001", "00002"):
            write_image(raw / "train" / scene / sample / "rgb.png", key=f"{scene}{sample}rgb")
            write_image(raw / "train" / scene / sample / "depth.png", key=f"{scene}{sample}d")
            expect["train"].append((f"{scene}_{sample}", scene.split("_")[0]))
    for sample in ("00001", "00002"):
        write_image(raw / "val" / "official" / sample / "rgb.png", key=f"val{sample}rgb")
        write_image(raw / "val" / "official" / sample / "depth.png", key=f"val{sample}d")
        expect["test"].append((f"official_{sample}", "official"))
    (raw / "train" / "README.txt").write_text("stray file")
    return {s: sorted(v) for s, v in expect.items()}


def make_nyudv2_tars(folder: Path) -> None:
    """Hugging Face style tars of fast-depth HDF5 frames (``rgb`` 3xHxW uint8, ``depth`` HxW metres)."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    members = {"train-000000.tar": ["train/living_room_0001/00001.h5", "train/living_room_0001/00002.h5"],
               "val-000000.tar": ["val/official/00001.h5"]}
    for tar_name, names in members.items():
        with tarfile.open(folder / tar_name, "w") as tf:
            for k, name in enumerate(names):
                buf = io.BytesIO()
                with h5py.File(buf, "w") as h:
                    h["rgb"] = np.full((3, 4, 5), 10 * (k + 1), dtype=np.uint8)
                    h["depth"] = np.linspace(0.0, 12.0, 20, dtype=np.float32).reshape(4, 5)
                data = buf.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------ Clotho
CLOTHO_DEV = [
    ("rain on roof.wav", 'Rain falls, steadily "and" softly, on a roof.'),
    ("birds, morning.v2.wav", "Birds chirp in the morning."),
    ("a.wav", "A door creaks open, then shuts."),
]
CLOTHO_EVAL = [("street.wav", "Cars pass by on a wet street."), ("missing clip.wav", "Nothing here.")]


def make_clotho(root: Path, n_dev: int | None = None) -> dict:
    """Captions CSVs with five captions; one evaluation WAV is missing. ``n_dev`` adds more dev rows."""
    import csv

    base = root / "clotho"
    dev = list(CLOTHO_DEV) + [(f"clip {k:03d}.wav", f"Sound number {k}, with a comma.") for k in range(n_dev or 0)]
    for folder, rows in (("development", dev), ("evaluation", CLOTHO_EVAL)):
        (base / folder).mkdir(parents=True, exist_ok=True)
        with open(base / f"clotho_captions_{folder}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
            for fname, cap in rows:
                w.writerow([fname, cap] + [f"{cap} (variant {i})" for i in range(2, 6)])
                if fname != "missing clip.wav":
                    write_wav(base / folder / fname, key=fname)
    return {"dev": dev, "eval": CLOTHO_EVAL}


# ------------------------------------------------------------------------------------ VGGSound
VGG_ROWS = [  # (ytid, start, label, split, has_mp4, has_mp3) in YouTube-id order, as the real CSV
    ("---g-f_I2yQ", 1, "people marching", "test", True, True),
    ("--0PQM4-hqg", 30, "waterfall burbling", "train", True, True),
    ("--56QUhyDQM", 185, "playing tennis", "train", False, True),
    ("--5OkAjCI7g", 40, "bird chirping, tweeting", "train", True, True),
    ("--8puiAGLhs", 30, "car engine starting", "train", True, False),
    ("--96EN9NUQM", 242, "bird chirping, tweeting", "test", True, True),
    ("--9O4XZOge4", 20, "people marching", "train", True, True),
    ("--BPbBqtfXU", 4, "waterfall burbling", "test", True, True),
    ("--Ds__nX8tA", 10, "playing tennis", "train", True, True),
    ("--E0Sz3bY_o", 50, "car engine starting", "test", False, False),
    ("--GWKSsjfsI", 0, "people marching", "test", True, True),
    ("--H3rPGK_-0", 7, "waterfall burbling", "train", True, True),
]


def make_vggsound(root: Path) -> dict:
    import csv

    base = root / "vggsound"
    final = base / "scratch/shared/beegfs/hchen/train_data/VGGSound_final"
    (final / "video").mkdir(parents=True)
    (final / "audio").mkdir(parents=True)
    with open(base / "vggsound.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        for ytid, start, label, split, mp4, mp3 in VGG_ROWS:
            w.writerow([ytid, start, label, split])
            rid = f"{ytid}_{start:06d}"
            if mp4:
                write_video(final / "video" / f"{rid}.mp4")
            if mp3:
                write_mp3(final / "audio" / f"{rid}.mp3")
    return {"final": final}


# ------------------------------------------------------------------------------------ TVL
def make_tvl(root: Path) -> dict:
    import csv

    base = root / "tvl" / "tvl_dataset"

    def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    ss = base / "ssvtp"
    for k in range(4):
        write_image(ss / "images_rgb" / f"image_{k}_rgb.jpg")
        write_image(ss / "images_tac" / f"image_{k}_tac.jpg")
        (ss / "text").mkdir(parents=True, exist_ok=True)
        (ss / "text" / f"labels_{k}.txt").write_text("smooth, hard")
    write_csv(ss / "train.csv", ["url", "tactile", "caption"], [
        ["images_rgb/image_0_rgb.jpg", "images_tac/image_0_tac.jpg", "smooth, hard.\r\n"],
        ["images_rgb/image_1_rgb.jpg", "images_tac/image_1_tac.jpg", ""],
        ["images_rgb/image_2_rgb.jpg", "images_tac/image_2_tac.jpg", "Rough, Soft, glossy."],
    ])
    write_csv(ss / "test.csv", ["url", "caption"], [["images_rgb/image_3_rgb.jpg", "bumpy. textured"]])
    for d in (1, 2, 3):
        sub = base / "hct" / f"data{d}"
        traj = f"0-170250721{d}.615537"
        rows = {"train": [], "test": []}
        for k in range(3):
            split = "test" if k == 2 else "train"
            write_image(sub / traj / "vision" / f"{k}.jpg", key=f"h{d}v{k}")
            write_image(sub / traj / "tactile" / f"{k}.jpg", key=f"h{d}t{k}")
            rows[split].append([f"{traj}/vision/{k}.jpg", f"{traj}/tactile/{k}.jpg", f"{traj}/tactile/bg.jpg",
                                f"hard, cold{d}.{k}"])
        for split, r in rows.items():
            write_csv(sub / f"{split}.csv", ["url", "tactile", "tactile_background", "caption"], r)
    return {"base": base}


# ------------------------------------------------------------------------------------ LLVIP
def make_llvip(root: Path) -> dict:
    base = root / "llvip" / "LLVIP"
    for split, names in (("train", ["010001", "010002", "010003"]), ("test", ["190001", "190002"])):
        for n in names:
            write_image(base / "visible" / split / f"{n}.jpg", key=f"v{n}")
            if n != "010003":  # a visible image without its infrared partner
                write_image(base / "infrared" / split / f"{n}.jpg", key=f"i{n}")
    (base / "visible" / "train" / "list.txt").write_text("stray")
    (base / "Annotations").mkdir(parents=True)
    (base / "Annotations" / "010001.xml").write_text("<annotation/>")
    return {"base": base}
