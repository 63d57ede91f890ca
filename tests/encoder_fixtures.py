"""Tiny media and vocabulary files for the encoder tests (written to tmp dirs, nothing downloaded)."""

from __future__ import annotations

import gzip
import json
import wave
from pathlib import Path

import numpy as np
from PIL import Image

from cmcl.extract.encoders.tokenizer import byte_to_unicode

#: a tiny merge list: "hello" and "dog" become single tokens
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("d", "o"), ("do", "g</w>")]
# ids implied by the merge order: 512 byte symbols, then one id per merge, then SOT, EOT
HELLO, DOG, SOT, EOT = 512 + 3, 512 + 5, 518, 519


def write_bpe_gz(path: Path) -> Path:
    lines = ["#version: tiny test merges"] + [f"{a} {b}" for a, b in MERGES]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_hf_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt with the same ids as :func:`write_bpe_gz`."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(byte_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n",
                                       encoding="utf-8")
    return folder


def write_image(path: Path, size=(64, 48), seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 440.0, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    data = np.repeat((x * 32767).astype("<i2")[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def write_depth_png(path: Path, metres: float = 2.0, size=(40, 30)) -> Path:
    w, h = size
    Image.fromarray(np.full((h, w), int(metres * 1000), dtype=np.uint16)).save(path)
    return path


def video_frames(n: int = 60, fps: float = 10.0, size=(64, 48)) -> tuple[np.ndarray, float]:
    """Frame i is a constant image of value 4*i, so tests can tell which frames were sampled."""
    w, h = size
    frames = np.stack([np.full((h, w, 3), 4 * i % 256, dtype=np.uint8) for i in range(n)])
    return frames, fps


def extract_records(encoder, records, root: Path, *, split: str, modalities, batch_size: int = 2,
                    dataset: str = "toy", **kwargs):
    """Extract ``records`` (dicts: id, optional label/class, one item per modality) through the
    ``pairs`` reader and the extraction engine; returns the engine's ``ExtractResult``."""
    import json as _json

    from cmcl.data.readers.pairs import Pairs
    from cmcl.extract.engine import extract_split

    manifest = root / f"{dataset}-{split}.jsonl"
    manifest.write_text("".join(_json.dumps(dict(r, split=split)) + "\n" for r in records))
    reader = Pairs(root, manifest=str(manifest), dataset=dataset, modalities=",".join(modalities))
    return extract_split(encoder, reader, split, root / "cache", batch_size=batch_size, progress=False, **kwargs)
