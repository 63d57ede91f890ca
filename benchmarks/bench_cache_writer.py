"""Throughput of the extraction path without a GPU: cache writer, part commits, decoders, readers.

Run from the repository root:

    python benchmarks/bench_cache_writer.py [--rows 200000] [--dim 1024] [--decode-items 200]

Prints a markdown table (numbers for ``docs/performance.md``, section "Extraction"). Everything is
synthetic and written to a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmcl.data.features import FeatureWriter, ShardMeta  # noqa: E402
from cmcl.extract import engine  # noqa: E402
from cmcl.extract.encoders.filehash import decode  # noqa: E402


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_writer(tmp: Path, rows: int, dim: int, modalities: tuple[str, ...], block: int,
                 check_blocks: bool) -> dict:
    """FeatureWriter.append in ``block``-row blocks, then close (which validates the whole file)."""
    blocks = [unit_rows(block, dim, s) for s in range(4)]
    ids = [[f"sample-{b:06d}-{i:05d}" for i in range(block)] for b in range(rows // block)]
    labels = np.zeros(block, dtype=np.int64)
    path = tmp / f"writer-{len(modalities)}.h5"
    meta = ShardMeta(backbone="bench", dataset="bench", split="train", dim=dim, modalities=modalities)
    t0 = time.perf_counter()
    w = FeatureWriter(path, meta, overwrite=True, check_blocks=check_blocks)
    for b in range(rows // block):
        w.append(ids[b], labels, {m: blocks[(b + k) % 4] for k, m in enumerate(modalities)})
    t1 = time.perf_counter()
    w.close()
    t2 = time.perf_counter()
    n = (rows // block) * block
    size = path.stat().st_size
    path.unlink()
    return {"append": n / (t1 - t0), "total": n / (t2 - t0), "mb": size / 2**20}


def bench_parts(tmp: Path, rows: int, dim: int, modalities: tuple[str, ...], block: int) -> dict:
    """The engine's commit (part files) and assembly of parts into the shard."""
    folder = tmp / "parts"
    folder.mkdir(exist_ok=True)
    x = unit_rows(block, dim, 0)
    t0 = time.perf_counter()
    for b in range(rows // block):
        engine._write_part(folder, b * block, (b + 1) * block, {
            "ids": [f"s{b:06d}-{i:05d}" for i in range(block)], "labels": np.zeros(block, np.int64),
            "text": None, "failures": [], "dim": dim, "emb": {m: [x] for m in modalities}})
    t1 = time.perf_counter()
    meta = ShardMeta(backbone="bench", dataset="bench", split="train", dim=dim, modalities=modalities)
    path = tmp / "assembled.h5"
    n = (rows // block) * block

    class _NoClasses:
        def class_names(self):
            return []

    engine._assemble(path, meta, folder, modalities, None, _NoClasses(), 64)
    t2 = time.perf_counter()
    return {"commit": n / (t1 - t0), "assemble": n / (t2 - t1)}


def make_media(tmp: Path) -> dict[str, Path]:
    """One file per decoder, at real-data sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    media = {}
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:  # ESC-50 clip: 5 s, 44.1 kHz, mono, 16 bit
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(rng.integers(-3000, 3000, 5 * 44100, dtype=np.int16).tobytes())
    media["audio (wav 5 s 44.1 kHz)"] = tmp / "clip.wav"
    media["audio (wav 5 s 44.1 kHz)"].write_bytes(buf.getvalue())
    def photo_like(h: int, w: int) -> np.ndarray:
        # smooth gradients plus mild noise: compresses like a photograph, unlike pure noise
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
        return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)

    Image.fromarray(photo_like(480, 640)).save(tmp / "rgb.png")
    media["vision (png 640x480, NYUDv2)"] = tmp / "rgb.png"
    Image.fromarray(photo_like(1024, 1280)).save(tmp / "v.jpg", quality=90)
    media["vision (jpeg 1280x1024, LLVIP)"] = tmp / "v.jpg"
    (tmp / "clip.mp4").write_bytes(b"\0\0\0\x18ftypisom" + os.urandom(2_000_000))
    media["video (2 MB mp4, container check only)"] = tmp / "clip.mp4"
    return media


def bench_decode(media: dict[str, Path], items: int) -> dict[str, float]:
    out = {}
    for label, path in media.items():
        modality = label.split(" ")[0]
        decode(modality, str(path))
        t0 = time.perf_counter()
        for _ in range(items):
            decode(modality, str(path))
        out[label] = items / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(items * 50):
        decode("text", f"a caption with some words {i}")
    out["text (caption)"] = items * 50 / (time.perf_counter() - t0)
    return out


def bench_engine(tmp: Path, dim: int) -> dict[str, float]:
    """End to end ``extract`` with the ``filehash`` encoder on 2,000 ESC-50-layout WAVs (items/s)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import dataset_fixtures as fx

    from cmcl.extract.encoders.filehash import FileHashEncoder

    fx.make_esc50(tmp / "esc-off", official=True)
    out = {}
    for workers in (0, 2):
        t0 = time.perf_counter()
        res = engine.extract(FileHashEncoder(dim=dim), "esc50", "all", tmp / "esc-off", tmp / f"feat{workers}",
                             workers=workers, batch_size=64, progress=False)
        n = sum(r.rows for r in res)
        label = f"extract esc50 train+test ({n} clips, 2 modalities), workers={workers}"
        out[label] = n / (time.perf_counter() - t0)
    return out


def bench_readers(tmp: Path) -> dict[str, float]:
    """Indexing speed (records/s) of two readers on synthetic layouts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import dataset_fixtures as fx

    from cmcl.data.readers import get_reader

    out = {}
    fx.make_esc50(tmp / "esc")
    t0 = time.perf_counter()
    r = get_reader("esc50", tmp / "esc", cache_dir=tmp / "cache")
    n = len(r.records("train")) + len(r.records("test"))
    out["esc50 parquet index (2,000 rows)"] = n / (time.perf_counter() - t0)
    fx.make_clotho(tmp / "clo", n_dev=5000)
    t0 = time.perf_counter()
    r = get_reader("clotho", tmp / "clo")
    n = len(r.records("train"))
    out["clotho CSV index (5,003 rows)"] = n / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--block", type=int, default=1024, help="rows per append (the engine's commit size)")
    ap.add_argument("--decode-items", type=int, default=200)
    args = ap.parse_args()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.machine()}; rows={args.rows} dim={args.dim} block={args.block}\n")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("| FeatureWriter, d = %d | validation | append rows/s | rows/s incl. close | file MB |" % args.dim)
        print("|---|---|---|---|---|")
        for mods in (("audio",), ("text", "audio", "video")):
            for check_blocks in (False, True):
                r = bench_writer(tmp, args.rows, args.dim, mods, args.block, check_blocks)
                how = "per block (check_blocks=True)" if check_blocks else "at close (default)"
                print(f"| {len(mods)} modalit{'y' if len(mods) == 1 else 'ies'} | {how} | {r['append']:,.0f} | "
                      f"{r['total']:,.0f} | {r['mb']:,.0f} |")
        r = bench_parts(tmp, args.rows, args.dim, ("text", "audio"), args.block)
        print(f"\n| engine, 2 modalities, d = {args.dim} | rows/s |\n|---|---|")
        print(f"| commit to part files | {r['commit']:,.0f} |")
        print(f"| assemble parts into the shard | {r['assemble']:,.0f} |")
        print("\n| decoder (filehash, one process) | items/s |\n|---|---|")
        for k, v in bench_decode(make_media(tmp), args.decode_items).items():
            print(f"| {k} | {v:,.0f} |")
        print(f"\n| engine end to end, filehash encoder, d = {args.dim} | items/s |\n|---|---|")
        for k, v in bench_engine(tmp, args.dim).items():
            print(f"| {k} | {v:,.0f} |")
        print("\n| reader | records/s |\n|---|---|")
        for k, v in bench_readers(tmp).items():
            print(f"| {k} | {v:,.0f} |")


if __name__ == "__main__":
    main()
