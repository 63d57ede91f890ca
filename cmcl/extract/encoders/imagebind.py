"""ImageBind behind the :class:`~cmcl.extract.encoders.base.Encoder` interface.

Weights: ``imagebind_huge.pth`` (a plain state dict), found through ``--checkpoint`` or
``CMCL_IMAGEBIND_CHECKPOINT``. The tokenizer's merge list ``bpe_simple_vocab_16e6.txt.gz`` is found
through ``--tokenizer``/``CMCL_CLIP_BPE``, next to the checkpoint, or inside an installed
``imagebind``/``open_clip`` package. ``random_weights="tiny"`` builds the tiny test configuration
instead (and, without a merge list, a merge-free byte vocabulary for text).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmcl.errors import EncoderError
from cmcl.extract.encoders import preprocess as P
from cmcl.extract.encoders.base import Encoder
from cmcl.extract.encoders.checkpoints import (
    KeyReport,
    compare_keys,
    drop_module_prefix,
    expected_shapes,
    file_sha256,
    load_strict,
    missing_checkpoint_error,
    read_torch_state,
    resolve_path,
    shapes_of,
    state_dict_of,
)
from cmcl.extract.encoders.imagebind_arch import (
    CONFIGS,
    HUGE,
    ImageBindConfig,
    ImageBindNet,
    build_imagebind,
)
from cmcl.extract.encoders.tokenizer import ClipTokenizer, byte_to_unicode

IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SOURCE = ("the imagebind-unofficial or open_clip_torch wheel (imagebind/bpe/" + BPE_NAME +
              "), or github.com/facebookresearch/ImageBind/tree/main/imagebind/bpe")
BPE_ENV = "CMCL_CLIP_BPE"


@dataclass(frozen=True)
class ImageBindPreprocessing:
    """Every preprocessing parameter; recorded as JSON in the shard attribute ``preprocessing``."""

    image_size: int = 224
    video_clips: int = 5
    video_clip_seconds: float = 2.0
    video_frames_per_clip: int = 2
    audio_rate: int = 16000
    audio_mel_bins: int = 128
    audio_frames: int = 204
    audio_clips: int = 3
    audio_clip_seconds: float = 2.0
    audio_mean: float = -4.268
    audio_std: float = 9.138
    depth_mode: str = "auto"  # grey for 8-bit images (CMCL reference), disparity otherwise
    depth_png_scale: float = 1000.0
    depth_min: float = 0.01
    depth_max: float = 50.0
    depth_baseline: float = 0.075
    depth_focal: float = 518.857901
    depth_mean: float = 0.0
    depth_std: float = 1.0
    thermal: str = "unibind: grey, bicubic resize, center crop, normalise(0.5, 0.5)"
    imu_length: int = 2000
    context_length: int = 77


def find_bpe(given: str | os.PathLike | None, checkpoint: Path | None) -> Path | None:
    """The CLIP merge list: explicit path, ``$CMCL_CLIP_BPE``, beside the checkpoint, or an installed package."""
    path = resolve_path(given, BPE_ENV)
    if path is not None:
        if not path.is_file():
            raise EncoderError(f"tokenizer file {path} does not exist; expected {BPE_NAME} "
                               f"(download: {BPE_SOURCE}); pass it with --tokenizer PATH or set {BPE_ENV}")
        return path
    if checkpoint is not None and (checkpoint.parent / BPE_NAME).is_file():
        return checkpoint.parent / BPE_NAME
    for package, rel in (("imagebind", ("bpe", BPE_NAME)), ("open_clip", (BPE_NAME,))):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(root, *rel)
            if candidate.is_file():
                return candidate
    return None


def byte_level_tokenizer(context_length: int = 77, **kw: Any) -> ClipTokenizer:
    """A merge-free CLIP vocabulary (512 byte symbols + SOT + EOT), for random-weight smoke tests;
    ``kw`` goes to :class:`ClipTokenizer` (``cleaning``, ``pad_id``)."""
    chars = list(byte_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return ClipTokenizer({t: i for i, t in enumerate(vocab)}, [], context_length=context_length,
                         source="byte-level (no merges; random-weights smoke test only)", **kw)


class ImageBindEncoder(Encoder):
    """ImageBind: vision (and tactile, event, video through the vision tower), text, audio, depth,
    thermal and IMU; 1024-d for the released model."""

    name = "imagebind"
    #: modality -> tower of the network
    TOWER_OF: Mapping[str, str] = {"vision": "vision", "tactile": "vision", "video": "vision", "text": "text",
                                   "audio": "audio", "depth": "depth", "thermal": "thermal", "imu": "imu"}
    CHECKPOINT_ENV = "CMCL_IMAGEBIND_CHECKPOINT"
    CHECKPOINT_FILE = "imagebind_huge.pth"
    CHECKPOINT_SOURCE = IMAGEBIND_URL

    def __init__(self, net: ImageBindNet, tokenizer: ClipTokenizer, *, checkpoint: str = "",
                 random_weights: str = "", config_name: str = "huge", device: str | torch.device = "cpu",
                 fp16: bool = False, prep: ImageBindPreprocessing | None = None,
                 report: KeyReport | None = None, extra_state: dict[str, torch.Tensor] | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.net = net.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.dim = net.cfg.out_embed_dim
        self.modalities = tuple(self.TOWER_OF)
        self.checkpoint = checkpoint
        self.random_weights = random_weights
        self.config_name = config_name
        self.prep = prep or ImageBindPreprocessing(audio_mel_bins=net.cfg.audio_mel_bins,
                                                   audio_frames=net.cfg.audio_frames,
                                                   image_size=net.cfg.image_size,
                                                   context_length=net.cfg.context_length)
        self.report = report
        #: checkpoint entries that are not part of the network (UniBind's point encoder...)
        self.extra_state = extra_state or {}
        self._sha256 = ""

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, *, random_weights: str | None = None,
             device: str | torch.device | None = None, fp16: bool = False,
             tokenizer: str | os.PathLike | None = None, trust_pickle: bool = False,
             config: ImageBindConfig = HUGE, **_: Any) -> ImageBindEncoder:
        """Load the released weights, or build ``random_weights`` (``"tiny"``/``"huge"``) at random.

        ``config`` is the architecture the checkpoint must match (the released one by default; the
        tests pass the tiny one).
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if random_weights:
            if random_weights not in CONFIGS:
                raise EncoderError(f"{cls.name}: unknown --random-weights {random_weights!r} "
                                   f"(choose from {sorted(CONFIGS)})")
            net = build_imagebind(CONFIGS[random_weights])
            bpe = find_bpe(tokenizer, None)
            tok = ClipTokenizer.from_bpe_gz(bpe) if bpe else byte_level_tokenizer(net.cfg.context_length)
            return cls(net, tok, random_weights=random_weights, config_name=random_weights,
                       device=device, fp16=fp16)
        path = cls.checkpoint_path(checkpoint)
        state = cls.read_state(path, trust_pickle=trust_pickle)
        state, extra = cls.split_state(state)
        net = build_imagebind(config, device="meta")
        report = load_strict(net, state, str(path))
        bpe = find_bpe(tokenizer, path)
        if bpe is None:
            raise EncoderError(f"{cls.name}: no tokenizer file; expected {BPE_NAME} (download: {BPE_SOURCE}); "
                               f"pass it with --tokenizer PATH, set {BPE_ENV}, or put it next to {path}")
        name = next((k for k, v in CONFIGS.items() if v == config), "custom")
        return cls(net, ClipTokenizer.from_bpe_gz(bpe), checkpoint=str(path), device=device, fp16=fp16,
                   report=report, extra_state=extra, config_name=name)

    @classmethod
    def checkpoint_path(cls, given: str | os.PathLike | None) -> Path:
        path = resolve_path(given, cls.CHECKPOINT_ENV)
        if path is None or not path.is_file():
            raise missing_checkpoint_error(cls.name, cls.CHECKPOINT_FILE, cls.CHECKPOINT_SOURCE,
                                           "--checkpoint", cls.CHECKPOINT_ENV, path)
        return path

    @classmethod
    def read_state(cls, path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
        return drop_module_prefix(state_dict_of(read_torch_state(path, trust_pickle=trust_pickle), path))

    @classmethod
    def split_state(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(network weights, entries kept aside). ImageBind keeps nothing aside."""
        return state, {}

    @classmethod
    def check_checkpoint(cls, checkpoint: str | os.PathLike | None, *, trust_pickle: bool = False,
                         config: ImageBindConfig = HUGE, **_: Any) -> KeyReport:
        """Compare the file's keys and shapes with the full-size network, without loading tensor data."""
        path = cls.checkpoint_path(checkpoint)
        state, extra = cls.split_state(cls.read_state(path, trust_pickle=trust_pickle))
        net = build_imagebind(config, device="meta")
        return compare_keys(expected_shapes(net), shapes_of(state), ignored=extra)

    # ------------------------------------------------------------------ Encoder interface
    def preprocessor(self, modality: str) -> Callable[[Any], torch.Tensor]:
        p = self.prep
        makers: dict[str, Callable[[Any], torch.Tensor]] = {
            "vision": functools.partial(P.imagebind_image, size=p.image_size),
            "tactile": functools.partial(P.imagebind_image, size=p.image_size),
            "text": self.tokenizer,
            "audio": functools.partial(P.imagebind_audio, rate=p.audio_rate, mel_bins=p.audio_mel_bins,
                                       target_frames=p.audio_frames, clip_duration=p.audio_clip_seconds,
                                       clips=p.audio_clips, mean=p.audio_mean, std=p.audio_std),
            "video": functools.partial(P.imagebind_video, size=p.image_size, clip_duration=p.video_clip_seconds,
                                       clips=p.video_clips, frames_per_clip=p.video_frames_per_clip),
            "depth": functools.partial(P.imagebind_depth, size=p.image_size, mode=p.depth_mode,
                                       png_scale=p.depth_png_scale,
                                       min_depth=p.depth_min, max_depth=p.depth_max, baseline=p.depth_baseline,
                                       focal=p.depth_focal, mean=p.depth_mean, std=p.depth_std),
            "thermal": functools.partial(P.unibind_thermal, size=p.image_size),
            "imu": functools.partial(P.imu_signal, length=p.imu_length),
        }
        if modality not in self.TOWER_OF:
            raise EncoderError(f"{self.name} cannot embed {modality!r} (it embeds {list(self.modalities)})")
        return makers.get(modality) or makers[self.TOWER_OF[modality]]

    def encode_batch(self, modality: str, batch: torch.Tensor) -> np.ndarray:
        tower = self.TOWER_OF[modality]
        x = batch.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        with torch.inference_mode():
            y = self.net.embed(tower, x)
        return F.normalize(y.float(), dim=-1).cpu().numpy().astype(np.float32)

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "random_weights": self.random_weights,
            "encoder_config": self.config_name,
            "preprocessing": json.dumps(asdict(self.prep), sort_keys=True),
            "tokenizer": self.tokenizer.source,
            "tokenizer_ftfy": bool(self.tokenizer.use_ftfy),
            "tokenizer_cleaning": self.tokenizer.cleaning,
            "fp16": self.dtype == torch.float16,
            "output": "upstream postprocessing and clip mean, then L2-renormalised",
        }
        if self.checkpoint and Path(self.checkpoint).is_file():
            if not self._sha256:
                self._sha256 = file_sha256(self.checkpoint)
            attrs["checkpoint_sha256"] = self._sha256
        return attrs
