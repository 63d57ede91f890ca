"""Rough CPU throughput of the encoders' preprocessing and tiny models (numbers for docs/performance.md).

Usage: python benchmarks/bench_encoders.py [--full]   (--full adds the full-size ImageBind vision tower)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmcl.extract.encoders import load_encoder


def media(d: Path) -> dict:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(d / "img.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (480, 640), dtype=np.uint8)).save(d / "th.png")
    Image.fromarray(rng.integers(500, 5000, (480, 640), dtype=np.uint16)).save(d / "depth.png")
    x = (0.3 * rng.standard_normal(44100 * 10)).clip(-1, 1)
    with wave.open(str(d / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(44100)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    frames = rng.integers(0, 256, (300, 240, 320, 3), dtype=np.uint8)  # 10 s at 30 fps, decoded
    return {"vision": str(d / "img.jpg"), "thermal": str(d / "th.png"), "depth": str(d / "depth.png"),
            "audio": str(d / "a.wav"), "video": (frames, 30.0), "text": "a dog barks at the mailman twice"}


def timed(fn, n: int) -> float:
    """Best of ``n`` runs after a warm-up (the machine may be shared; the minimum is the stable figure)."""
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        items = media(Path(tmp))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for name in ("imagebind", "languagebind"):
            enc = load_encoder(name, random_weights="tiny", device="cpu")
            print(f"\n{name} (tiny, random weights), batch 8")
            print("| modality | preprocess ms/item | model items/s (tiny) | input shape |")
            print("|---|---|---|---|")
            for m in ("vision", "text", "audio", "video", "depth", "thermal"):
                prep = enc.preprocessor(m)
                ms = 1000 * timed(lambda: prep(items[m]), 5)
                batch = torch.stack([prep(items[m])] * 8)
                sec = timed(lambda: enc.encode_batch(m, batch), 5)
                print(f"| {m} | {ms:.1f} | {8 / sec:.0f} | {tuple(batch.shape[1:])} |")
        if args.full:
            enc = load_encoder("imagebind", random_weights="huge", device="cpu")
            batch = torch.stack([enc.preprocessor("vision")(items["vision"])] * 2)
            sec = timed(lambda: enc.encode_batch("vision", batch), 1)
            print(f"\nimagebind huge (random weights), vision, batch 2: {2 / sec:.2f} items/s")


if __name__ == "__main__":
    main()
