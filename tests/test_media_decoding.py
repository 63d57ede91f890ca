"""Real media decoding through PyAV (the `media` extra): a generated MP4 into the video preprocessors."""

from __future__ import annotations

import av  # the `media` extra; part of the `test` extra so these always run
import numpy as np
import pytest
import torch

from cmcl.extract.encoders import load_encoder
from cmcl.extract.encoders.preprocess import decode_video, imagebind_video, languagebind_video

FPS, SECONDS, W, H = 30, 3, 64, 48


def write_mp4(path, seconds=SECONDS):
    """A real MPEG-4 video whose red channel encodes the frame index (index * 2)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(FPS * seconds):
            img = np.zeros((H, W, 3), dtype=np.uint8)
            img[..., 0] = 2 * i
            img[..., 1] = 60
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_decoded_frames_times_and_content(tmp_path):
    video = decode_video(write_mp4(tmp_path / "clip.mp4"))
    assert video.frames.shape == (FPS * SECONDS, H, W, 3)
    assert video.duration == pytest.approx(SECONDS, abs=1 / FPS)
    np.testing.assert_allclose(np.diff(video.times), 1 / FPS, atol=1e-6)
    red = video.frames[..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(red, 2 * np.arange(FPS * SECONDS), atol=8)  # lossy codec


def test_video_preprocessing_of_a_file_equals_that_of_its_frames(tmp_path):
    path = write_mp4(tmp_path / "clip.mp4")
    video = decode_video(path)
    from_file = imagebind_video(path, size=32)
    from_frames = imagebind_video((video.frames, FPS), size=32)
    assert from_file.shape == (15, 3, 2, 32, 32)   # 5 clips x 3 crops, 2 frames each
    torch.testing.assert_close(from_file, from_frames)
    lb = languagebind_video(path, size=32)
    assert lb.shape == (3, 8, 32, 32) and torch.isfinite(lb).all()


def test_tiny_imagebind_embeds_a_real_video_file(tmp_path):
    path = write_mp4(tmp_path / "clip.mp4", seconds=2)
    enc = load_encoder("imagebind", random_weights="tiny", device="cpu")
    emb = enc.encode("video", [str(path), str(path)])
    assert emb.shape == (2, enc.dim) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)   # deterministic preprocessing
