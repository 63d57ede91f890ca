"""LanguageBind behind the :class:`~cmcl.extract.encoders.base.Encoder` interface.

Weights: one HF folder per modality (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
``vocab.json``, ``merges.txt``), fetched from ``https://huggingface.co/LanguageBind/<name>``.
``--checkpoint`` (or ``CMCL_LANGUAGEBIND_CHECKPOINT``) is either one such folder or a parent
folder holding them under their hub names (``LanguageBind_Image``, ``LanguageBind_Video_FT``...).
Towers are loaded on first use. Text comes from the text tower of one chosen checkpoint
(``text_checkpoint``: a tower name such as ``"audio"`` or a folder; default: the tower paired with
the first non-text modality requested), recorded in the shard attribute ``text_checkpoint``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
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
    drop_ignorable,
    drop_module_prefix,
    expected_shapes,
    load_strict,
    read_safetensors,
    read_torch_state,
    resolve_path,
    shapes_of,
    state_dict_of,
)
from cmcl.extract.encoders.imagebind import byte_level_tokenizer
from cmcl.extract.encoders.languagebind_arch import (
    LanguageBindConfig,
    LanguageBindNet,
    build_languagebind,
    large_config,
    merge_lora,
    tiny_config,
)
from cmcl.extract.encoders.tokenizer import ClipTokenizer

HUB = "https://huggingface.co/LanguageBind/"
ENV = "CMCL_LANGUAGEBIND_CHECKPOINT"
#: tower -> hub folder names searched under a parent folder, in order of preference
FOLDERS: Mapping[str, tuple[str, ...]] = {
    "image": ("LanguageBind_Image",),
    "video": ("LanguageBind_Video_FT", "LanguageBind_Video_V1.5_FT", "LanguageBind_Video",
              "LanguageBind_Video_Huge_V1.5_FT"),
    "audio": ("LanguageBind_Audio_FT", "LanguageBind_Audio"),
    "depth": ("LanguageBind_Depth",),
    "thermal": ("LanguageBind_Thermal",),
}
#: cmcl modality -> LanguageBind tower
TOWER_OF: Mapping[str, str] = {"vision": "image", "tactile": "image", "video": "video", "audio": "audio",
                               "depth": "depth", "thermal": "thermal"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def tower_of_config(cfg: LanguageBindConfig, folder: Path) -> str:
    kind = cfg.model_type.removeprefix("LanguageBind").lower()
    if kind not in FOLDERS:
        raise EncoderError(f"{folder}/config.json: model_type {cfg.model_type!r} is not a LanguageBind "
                           f"checkpoint (expected LanguageBindImage, ...Video, ...Audio, ...Depth, ...Thermal)")
    return kind


def read_config(folder: Path) -> LanguageBindConfig:
    path = folder / "config.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{path}: cannot read the LanguageBind config ({exc})") from None
    try:
        return LanguageBindConfig.from_dict(d)
    except EncoderError as exc:
        raise EncoderError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise EncoderError(f"{path}: cannot read the LanguageBind config ({exc})") from None


def _weight_parts(folder: Path) -> list[Path]:
    """The weight file(s) of an HF folder: one file, or the shards its ``*.index.json`` lists."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            files = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(f"{path}: not a weight index ({exc})") from None
        for f in files:
            if not (folder / f).is_file():
                raise EncoderError(f"{folder / f}: listed in {path.name} but missing")
        return [folder / f for f in files]
    raise EncoderError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_FILES)}; "
                       f"download: {HUB}{folder.name})")


def read_folder_shapes(folder: Path, *, trust_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an HF folder's weights without reading tensor data (safetensors headers,
    memory-mapped ``torch.load`` otherwise)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for part in _weight_parts(folder):
        if part.suffix == ".safetensors":
            try:
                with safe_open(str(part), framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
            except Exception as exc:  # safetensors raises its own exception types
                raise EncoderError(f"{part}: not a readable safetensors file ({exc})") from None
        else:
            shapes.update(shapes_of(state_dict_of(read_torch_state(part, trust_pickle=trust_pickle), part)))
    if shapes and all(k.startswith("module.") for k in shapes):
        shapes = {k[len("module."):]: v for k, v in shapes.items()}
    return shapes


def plain_shapes(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Shapes after LoRA unwrapping (adapter matrices dropped) and without stale buffers."""
    plain, dropped = {}, []
    for key, shape in shapes.items():
        key = key.replace(".base_model.model.", ".").replace(".base_layer.", ".")
        if ".lora_A" in key or ".lora_B" in key or key.endswith(".position_ids"):
            dropped.append(key)
        else:
            plain[key] = shape
    return plain, dropped


def read_folder_state(folder: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (single file or sharded index), memory-mapped where possible."""
    state: dict[str, torch.Tensor] = {}
    for part in _weight_parts(folder):
        state.update(read_safetensors(part) if part.suffix == ".safetensors"
                     else state_dict_of(read_torch_state(part, trust_pickle=trust_pickle), part))
    return drop_module_prefix(state)


def prepare_state(state: Mapping[str, torch.Tensor], cfg: LanguageBindConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Merge LoRA, drop stale ``position_ids`` buffers; returns (state, dropped keys)."""
    plain, _ = merge_lora(state, alpha=cfg.vision.lora_alpha)
    return drop_ignorable(plain)


class LanguageBindEncoder(Encoder):
    """LanguageBind: image (vision, tactile), video, audio, depth, thermal and text; 768-d for the
    Large checkpoints (the width is read from ``projection_dim``)."""

    name = "languagebind"

    def __init__(self, *, folders: Mapping[str, Path] | None = None, text_source: str = "image",
                 text_folder: Path | None = None, tokenizer: ClipTokenizer | None = None,
                 random_weights: str = "", device: str | torch.device = "cpu", fp16: bool = False,
                 antialias: bool = False, trust_pickle: bool = False, checkpoint: str = "") -> None:
        self.device = torch.device(device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.random_weights = random_weights
        self.folders = dict(folders or {})
        self.antialias = antialias
        self.trust_pickle = trust_pickle
        self._nets: dict[str, LanguageBindNet] = {}
        self.reports: dict[str, KeyReport] = {}
        if random_weights:
            make = tiny_config if random_weights == "tiny" else large_config
            self.configs = {t: make(t) for t in FOLDERS}
            towers = list(FOLDERS)
        else:
            self.configs = {t: read_config(f) for t, f in self.folders.items()}
            towers = list(self.folders)
        self.modalities = tuple(m for m, t in TOWER_OF.items() if t in towers) + ("text",)
        self.text_source = text_source
        self.text_folder = text_folder or self.folders.get(text_source)
        text_cfg = read_config(self.text_folder) if self.text_folder and not random_weights else self.configs[text_source]
        self.dim = text_cfg.projection_dim
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer or byte_level_tokenizer(cleaning="hf")
        for tower, cfg in self.configs.items():
            if cfg.projection_dim != self.dim:
                raise EncoderError(f"languagebind: {self.folders.get(tower, tower)} projects to {cfg.projection_dim} "
                                   f"dims but the text checkpoint to {self.dim}; use checkpoints of one size")

    # ------------------------------------------------------------------ construction
    @classmethod
    def find_folders(cls, root: Path) -> dict[str, Path]:
        """tower -> folder: ``root`` itself (a single checkpoint) or its hub-named subfolders."""
        if (root / "config.json").is_file():
            return {tower_of_config(read_config(root), root): root}
        found = {}
        for tower, names in FOLDERS.items():
            for name in names:
                if (root / name / "config.json").is_file():
                    found[tower] = root / name
                    break
        return found

    @classmethod
    def _missing(cls, path: Path | None) -> EncoderError:
        where = f"{path} holds no LanguageBind checkpoint folder; " if path else "no checkpoint given; "
        return EncoderError(
            f"languagebind: {where}expected HF folders such as LanguageBind_Image, LanguageBind_Video_FT, "
            f"LanguageBind_Audio_FT, LanguageBind_Depth, LanguageBind_Thermal (download: {HUB}<name>, e.g. "
            f"huggingface-cli download LanguageBind/LanguageBind_Image --local-dir DIR/LanguageBind_Image); "
            f"pass the folder or its parent with --checkpoint PATH or set {ENV}=PATH, or use --random-weights tiny")

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, *, random_weights: str | None = None,
             device: str | torch.device | None = None, fp16: bool = False,
             tokenizer: str | os.PathLike | None = None, text_checkpoint: str | os.PathLike | None = None,
             modalities: Sequence[str] | None = None, antialias: bool = False, trust_pickle: bool = False,
             **_: Any) -> LanguageBindEncoder:
        """Locate the checkpoint folders (nothing is read but configs until a tower is used)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        first = next((TOWER_OF[m] for m in (modalities or ()) if m in TOWER_OF), "image")
        if random_weights:
            if random_weights not in ("tiny", "large"):
                raise EncoderError(f"languagebind: unknown --random-weights {random_weights!r} "
                                   f"(choose from ['large', 'tiny'])")
            source = str(text_checkpoint) if text_checkpoint in FOLDERS else first
            tok = cls._tokenizer_from(Path(tokenizer)) if tokenizer else None
            return cls(random_weights=random_weights, text_source=source, tokenizer=tok, device=device, fp16=fp16,
                       antialias=antialias)
        root = resolve_path(checkpoint, ENV)
        if root is None or not root.is_dir():
            raise cls._missing(root)
        folders = cls.find_folders(root)
        if not folders:
            raise cls._missing(root)
        if text_checkpoint and str(text_checkpoint) in FOLDERS:
            source = str(text_checkpoint)
            if source not in folders:
                raise EncoderError(f"languagebind: text checkpoint {source!r} requested but {root} has no "
                                   f"{' or '.join(FOLDERS[source])} folder")
            text_folder = folders[source]
        elif text_checkpoint:
            text_folder = Path(text_checkpoint)
            if not (text_folder / "config.json").is_file():
                raise EncoderError(f"languagebind: text checkpoint {text_folder} has no config.json")
            source = tower_of_config(read_config(text_folder), text_folder)
        else:
            source = first if first in folders else next(iter(folders))
            text_folder = folders[source]
        for m in modalities or ():
            if m in TOWER_OF and TOWER_OF[m] not in folders:
                raise EncoderError(f"languagebind: {m!r} needs one of {', '.join(FOLDERS[TOWER_OF[m]])} under {root} "
                                   f"(download: {HUB}{FOLDERS[TOWER_OF[m]][0]})")
        tok = cls._tokenizer_from(Path(tokenizer) if tokenizer else text_folder)
        return cls(folders=folders, text_source=source, text_folder=text_folder, tokenizer=tok, device=device,
                   fp16=fp16, antialias=antialias, trust_pickle=trust_pickle, checkpoint=str(root))

    @staticmethod
    def _tokenizer_from(folder: Path) -> ClipTokenizer:
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise EncoderError(f"languagebind: tokenizer files vocab.json and merges.txt are missing in {folder} "
                               f"(they ship in every {HUB}<name> folder, e.g. LanguageBind_Image); pass a folder "
                               f"holding them with --tokenizer PATH")
        return ClipTokenizer.from_hf_files(vocab, merges)

    @classmethod
    def check_checkpoint(cls, checkpoint: str | os.PathLike | None, *, trust_pickle: bool = False,
                         **_: Any) -> KeyReport:
        """Check every checkpoint folder found against the architecture its config.json describes."""
        root = resolve_path(checkpoint, ENV)
        folders = cls.find_folders(root) if root is not None and root.is_dir() else {}
        if not folders:
            raise cls._missing(root)
        total = KeyReport()
        for tower, folder in folders.items():
            cfg = read_config(folder)
            shapes, dropped = plain_shapes(read_folder_shapes(folder, trust_pickle=trust_pickle))
            r = compare_keys(expected_shapes(build_languagebind(cfg, device="meta")), shapes, dropped)
            total.matched += r.matched
            total.missing += [f"{folder.name}:{k}" for k in r.missing]
            total.unexpected += [f"{folder.name}:{k}" for k in r.unexpected]
            total.mismatched += [(f"{folder.name}:{k}", a, b) for k, a, b in r.mismatched]
            total.ignored += [f"{folder.name}:{k}" for k in r.ignored]
        return total

    def net(self, tower: str) -> LanguageBindNet:
        """The network of ``tower`` (``"image"``... or ``"text"``), loaded on first use."""
        key = self.text_source if tower == "text" else tower
        if key in self._nets:
            return self._nets[key]
        if self.random_weights:
            net = build_languagebind(self.configs[key], seed=sorted(FOLDERS).index(key))
        else:
            folder = self.text_folder if tower == "text" else self.folders[key]
            cfg = read_config(folder)
            state, dropped = prepare_state(read_folder_state(folder, trust_pickle=self.trust_pickle), cfg)
            net = build_languagebind(cfg, device="meta")
            self.reports[key] = load_strict(net, state, str(folder), ignored=dropped)
        self._nets[key] = net.to(device=self.device, dtype=self.dtype)
        return self._nets[key]

    # ------------------------------------------------------------------ Encoder interface
    def preprocessor(self, modality: str) -> Callable[[Any], torch.Tensor]:
        if modality == "text":
            return self.tokenizer
        if modality not in TOWER_OF or TOWER_OF[modality] not in self.configs:
            raise EncoderError(f"{self.name} cannot embed {modality!r} (it embeds {list(self.modalities)})")
        v = self.configs[TOWER_OF[modality]].vision
        size = v.image_size[0] if isinstance(v.image_size, (list, tuple)) else v.image_size
        tower = TOWER_OF[modality]
        if tower in ("image", "thermal"):
            return functools.partial(P.languagebind_image, size=size, antialias=self.antialias)
        if tower == "depth":
            return functools.partial(P.languagebind_depth, size=size, max_depth=v.max_depth, antialias=self.antialias)
        if tower == "video":
            return functools.partial(P.languagebind_video, size=size, num_frames=max(v.num_frames, 1))
        return functools.partial(P.languagebind_audio, rate=v.audio_sample_rate, mel_bins=v.num_mel_bins,
                                 target_frames=v.target_length, mean=v.audio_mean, std=v.audio_std)

    def encode_batch(self, modality: str, batch: torch.Tensor) -> np.ndarray:
        x = batch.to(self.device)
        with torch.inference_mode():
            if modality == "text":
                y = self.net("text").embed_text(x)
            else:
                y = self.net(TOWER_OF[modality]).embed_vision(x.to(self.dtype))
        return F.normalize(y.float(), dim=-1).cpu().numpy().astype(np.float32)

    def attributes(self) -> dict[str, Any]:
        prep = {t: {k: v for k, v in asdict(c.vision).items()
                    if k in ("image_size", "num_frames", "num_mel_bins", "target_length", "max_depth",
                             "audio_sample_rate", "audio_mean", "audio_std")}
                for t, c in self.configs.items()}
        prep["antialias"] = self.antialias
        prep["context_length"] = self.tokenizer.context_length
        return {
            "random_weights": self.random_weights,
            "encoder_config": self.random_weights or "from config.json",
            "preprocessing": json.dumps(prep, sort_keys=True),
            "tokenizer": self.tokenizer.source,
            "tokenizer_ftfy": bool(self.tokenizer.use_ftfy),
            "tokenizer_cleaning": self.tokenizer.cleaning,
            "text_checkpoint": str(self.text_folder or f"{self.random_weights}:{self.text_source}"),
            "tower_checkpoints": json.dumps({t: str(f) for t, f in self.folders.items()}, sort_keys=True),
            "fp16": self.dtype == torch.float16,
            "output": "projected features, L2-normalised (no logit scale)",
        }
