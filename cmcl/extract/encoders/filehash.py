"""``filehash``: a deterministic stand-in encoder for smoke tests of readers and the engine.

It embeds no meaning: each item is *decoded* with light standard tools (``wave`` for WAV, Pillow
for images, a container signature check for video), its decoded bytes are hashed, and the hash is
mapped to a unit vector by a fixed random projection. It therefore catches missing, truncated and
undecodable media like a real encoder would, needs no weights or GPU, and gives the same row for
the same content on any machine. Never use its features for results.
"""

from __future__ import annotations

import functools
import hashlib
import os
import wave
import zlib
from typing import Any, Callable

import numpy as np
import torch

from cmcl.extract.encoders.base import Encoder
from cmcl.types import MODALITIES

_DIGEST = 32
_IMAGE_MODALITIES = ("vision", "depth", "thermal", "tactile")
_VIDEO_SIGNATURES = ((4, b"ftyp"), (0, b"RIFF"), (0, b"\x1a\x45\xdf\xa3"))


def _wav_bytes(path: str) -> bytes:
    with wave.open(path, "rb") as w:
        n = w.getnframes()
        frames = w.readframes(n)
        want = n * w.getsampwidth() * w.getnchannels()
    if len(frames) != want:
        raise ValueError(f"truncated WAV: {len(frames)} of {want} data bytes")
    return frames


def _image_bytes(path: str) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decodes fully: raises on truncated or corrupt data
        return im.tobytes()


def _video_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    if not any(data[o:o + len(sig)] == sig for o, sig in _VIDEO_SIGNATURES):
        raise ValueError("not a video container (no mp4/avi/mkv signature)")
    return data


def decode(modality: str, item: Any) -> bytes:
    """Decoded content of one item, the way ``filehash`` reads it (raises on bad media)."""
    if modality == "text":
        return str(item).encode("utf-8")
    path = os.fspath(item)
    if modality == "video":
        return _video_bytes(path)
    if modality in _IMAGE_MODALITIES:
        return _image_bytes(path)
    if path.lower().endswith(".wav"):
        return _wav_bytes(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if not data:
        raise ValueError("empty file")
    return data


def _preprocess(modality: str, item: Any) -> torch.Tensor:
    digest = hashlib.blake2b(decode(modality, item), digest_size=_DIGEST).digest()
    return torch.from_numpy((np.frombuffer(digest, dtype=np.uint8).astype(np.float32) - 127.5) / 127.5)


class FileHashEncoder(Encoder):
    """Deterministic content-hash encoder (tests and smoke runs only).

    Args:
        dim: embedding width.
        modalities: modalities it accepts (default: every known one).
    """

    name = "filehash"

    def __init__(self, dim: int = 64, modalities: tuple[str, ...] = MODALITIES) -> None:
        self.dim = int(dim)
        self.modalities = tuple(modalities)
        self._proj: dict[str, torch.Tensor] = {}

    def preprocessor(self, modality: str) -> Callable[[Any], torch.Tensor]:
        """Decode and hash one item (picklable, runs in worker processes)."""
        return functools.partial(_preprocess, modality)

    def _projection(self, modality: str) -> torch.Tensor:
        if modality not in self._proj:
            g = torch.Generator().manual_seed(zlib.crc32(modality.encode()))
            self._proj[modality] = torch.randn(_DIGEST, self.dim, generator=g)
        return self._proj[modality]

    def encode_batch(self, modality: str, batch: torch.Tensor) -> np.ndarray:
        """Project hashed items and L2-normalise; rows do not depend on the batch they come in."""
        proj = self._projection(modality).double()
        y = batch.double() @ proj
        y = y / y.norm(dim=1, keepdim=True)
        return y.float().numpy()

    def attributes(self) -> dict[str, Any]:
        """Shard attributes: marks the features as meaningless."""
        return {"random_weights": "", "filehash": "blake2b-32, fixed random projection (not for results)"}
