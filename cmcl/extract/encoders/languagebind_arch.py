"""The LanguageBind dual encoder (HF-CLIP layout), written for inference.

One LanguageBind checkpoint folder (``LanguageBind_Image``, ``_Video_FT``, ``_Audio_FT``, ``_Depth``,
``_Thermal``...) holds ``config.json`` and the weights of a CLIP-style pair: ``text_model``,
``vision_model``, ``text_projection``, ``visual_projection`` and ``logit_scale``. The module names
below reproduce those keys so the files load strictly. Two LanguageBind-specific parts:

* video towers (``add_time_attn``) add, in every vision layer, a ``temporal_embedding`` and a
  ``temporal_attn`` (with ``temporal_layer_norm1``) over the frames of each patch position, and
  average the pooled, post-normed CLS over frames;
* audio towers see a 3-channel (mel bins x frames) "image" and have a non-square position table;
* V1.5 video towers (``vision_config.clip_type == "vl_new"``, upstream's ``CLIPVisionEmbeddings3D``)
  embed patches with a Conv3d of kernel ``(tube_size, p, p)`` and give every frame its own class
  token (``class_embedding`` of shape ``(num_frames // tube_size, width)``). Upstream's forward
  only runs with ``tube_size == 1`` (its temporal attention and pooling count ``num_frames``
  tokens per sample), so other tube sizes are refused.

LoRA checkpoints (peft-wrapped ``vision_model.encoder``) are merged into plain weights on load by
:func:`merge_lora`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmcl.errors import EncoderError


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    patch_size: int = 32
    image_size: int = 224
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    add_time_attn: bool = False
    num_frames: int = 1
    num_mel_bins: int = 0
    target_length: int = 0
    lora_r: int = 0
    lora_alpha: int = 16
    clip_type: str = "vl"
    tube_size: int = 1
    max_depth: float = 10.0
    audio_sample_rate: int = 16000
    audio_mean: float = -4.2677393
    audio_std: float = 4.5689974

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid: (mel//p, frames//p) for audio towers, else (image//p, image//p)."""
        if self.num_mel_bins and self.target_length:
            return self.num_mel_bins // self.patch_size, self.target_length // self.patch_size
        size = self.image_size[0] if isinstance(self.image_size, (list, tuple)) else self.image_size
        return size // self.patch_size, size // self.patch_size

    @property
    def per_frame_tokens(self) -> bool:
        """The V1.5 video layout: Conv3d patches and one class token per frame (``vl_new``)."""
        return self.add_time_attn and self.clip_type == "vl_new"


@dataclass(frozen=True)
class LanguageBindConfig:
    """The fields of a LanguageBind ``config.json`` that shape the network (HF defaults otherwise)."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    model_type: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LanguageBindConfig:
        def pick(klass, sub: Mapping[str, Any] | None):
            names = {f.name for f in fields(klass)}
            return klass(**{k: v for k, v in (sub or {}).items() if k in names})

        vision = dict(d.get("vision_config") or {})
        if isinstance(vision.get("image_size"), (list, tuple)):
            vision["image_size"] = int(vision["image_size"][0])
        model_type = str(d.get("model_type", ""))
        if model_type != "LanguageBindVideo":
            vision.pop("clip_type", None)  # only upstream's video model reads it
            vision.pop("tube_size", None)
        vision["clip_type"] = "vl_new" if vision.get("clip_type") == "vl_new" else "vl"  # upstream's test
        cfg = cls(text=pick(TextConfig, d.get("text_config")), vision=pick(VisionConfig, vision),
                  projection_dim=int(d.get("projection_dim", 512)), model_type=model_type)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Refuse layouts upstream cannot run either."""
        v = self.vision
        if v.clip_type == "vl_new" and not v.add_time_attn:
            raise EncoderError("vision_config.clip_type 'vl_new' without add_time_attn: upstream LanguageBind "
                               "builds no patch embedding for that combination")
        if v.per_frame_tokens and (int(v.tube_size) != 1 or v.num_frames < 1):
            raise EncoderError(f"vision_config.tube_size {v.tube_size} (num_frames {v.num_frames}): only "
                               f"tube_size 1 is supported; upstream LanguageBind's video forward groups "
                               f"num_frames tokens per sample and fails for larger tubes")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "projection_dim": self.projection_dim,
                "text_config": asdict(self.text), "vision_config": asdict(self.vision)}


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise EncoderError(f"unsupported hidden_act {name!r} in a LanguageBind config")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = _act(act)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, dim: int, inter: int, heads: int, act: str, eps: float, frames: int = 0) -> None:
        super().__init__()
        self.self_attn = _Attention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, inter, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.frames = frames
        if frames:
            self.temporal_embedding = nn.Parameter(torch.randn(1, frames, dim) * dim ** -0.5)
            self.temporal_attn = _Attention(dim, heads)
            self.temporal_layer_norm1 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        if self.frames:
            t = self.frames
            bt, n, d = x.shape
            # (b t) n d -> (b n) t d: attend over the frames of each token position
            xt = x.reshape(bt // t, t, n, d).transpose(1, 2).reshape(-1, t, d)
            if t != 1:
                xt = xt + self.temporal_embedding[:, :t]
            h = self.temporal_attn(self.temporal_layer_norm1(xt))
            x = (xt + h).reshape(bt // t, n, t, d).transpose(1, 2).reshape(bt, n, d)
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, n: int, *args, **kw) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(*args, **kw) for _ in range(n)])

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class _TextEmbeddings(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)


class _TextTransformer(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.embeddings = _TextEmbeddings(c)
        self.encoder = _Encoder(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                c.hidden_act, c.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        pos = torch.arange(n, device=ids.device)
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding(pos)[None]
        x = self.final_layer_norm(self.encoder(x, causal=True))
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]  # EOT has the largest id


class _VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        gh, gw = c.grid
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size) * c.hidden_size ** -0.5)
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(gh * gw + 1, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(x).flatten(2).transpose(1, 2)
        if patches.shape[1] + 1 != self.position_embedding.num_embeddings:
            raise ValueError(f"input of shape {tuple(x.shape)} gives {patches.shape[1]} patches, "
                             f"the model expects {self.position_embedding.num_embeddings - 1}")
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class _VisionEmbeddings3D(nn.Module):
    """V1.5 video embeddings (``clip_type="vl_new"``): Conv3d patches, one class token per frame,
    the spatial position table shared by all frames."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        gh, gw = c.grid
        self.frames = c.num_frames // c.tube_size
        self.class_embedding = nn.Parameter(torch.randn(self.frames, c.hidden_size) * c.hidden_size ** -0.5)
        kernel = (c.tube_size, c.patch_size, c.patch_size)
        self.patch_embedding = nn.Conv3d(c.num_channels, c.hidden_size, kernel, kernel, bias=False)
        self.position_embedding = nn.Embedding(gh * gw + 1, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B*T, 1 + patches, width), frames of one sample consecutive."""
        if x.ndim != 5 or x.shape[2] != self.frames:
            raise ValueError(f"input of shape {tuple(x.shape)}: this video tower takes (B, C, {self.frames}, H, W)")
        patches = self.patch_embedding(x).flatten(3).permute(0, 2, 3, 1)  # (B, T, patches, width)
        if patches.shape[2] + 1 != self.position_embedding.num_embeddings:
            raise ValueError(f"input of shape {tuple(x.shape)} gives {patches.shape[2]} patches per frame, "
                             f"the model expects {self.position_embedding.num_embeddings - 1}")
        cls = self.class_embedding[None, :, None].expand(x.shape[0], -1, -1, -1)
        tokens = torch.cat([cls, patches], dim=2) + self.position_embedding.weight
        return tokens.reshape(-1, *tokens.shape[2:])


class _VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.embeddings = _VisionEmbeddings3D(c) if c.per_frame_tokens else _VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # sic: HF's spelling
        self.encoder = _Encoder(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                c.hidden_act, c.layer_norm_eps, frames=c.num_frames if c.add_time_attn else 0)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], (x.shape[2] if x.ndim == 5 else 1)
        if isinstance(self.embeddings, _VisionEmbeddings3D):
            tokens = self.embeddings(x)
        else:
            if x.ndim == 5:  # (B, C, T, H, W) video -> (B*T, C, H, W) frames
                x = x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:])
            tokens = self.embeddings(x)
        h = self.encoder(self.pre_layrnorm(tokens))
        pooled = self.post_layernorm(h[:, 0])
        return pooled.reshape(b, t, -1).mean(1)


class LanguageBindNet(nn.Module):
    """One LanguageBind checkpoint: ``embed_text(ids)`` and ``embed_vision(pixels)`` give the
    un-normalised projected features (``get_text_features`` / ``get_image_features``)."""

    def __init__(self, cfg: LanguageBindConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = _TextTransformer(cfg.text)
        self.vision_model = _VisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(ids))

    def embed_vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))


def build_languagebind(cfg: LanguageBindConfig, *, device: str | torch.device = "cpu",
                       seed: int | None = 0) -> LanguageBindNet:
    cfg.validate()
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        net = LanguageBindNet(cfg).eval()
    return net.requires_grad_(False)


_LORA = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def merge_lora(state: Mapping[str, torch.Tensor], alpha: float | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Undo peft wrapping of ``vision_model.encoder`` and fold LoRA updates into the weights.

    Keys ``vision_model.encoder.base_model.model.X`` become ``vision_model.encoder.X`` and
    ``...base_layer.weight`` becomes ``...weight``; each ``lora_A``/``lora_B`` pair adds
    ``(alpha / r) * B @ A`` (r = rows of A) to its base weight. Returns the plain state dict and the
    number of merged LoRA pairs.
    """
    plain: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.replace(".base_model.model.", ".").replace(".base_layer.", ".")
        m = _LORA.match(key)
        if m:
            lora.setdefault(m["base"], {})[m["ab"]] = value
        else:
            plain[key] = value
    for base, ab in lora.items():
        if set(ab) != {"A", "B"} or f"{base}.weight" not in plain:
            raise EncoderError(f"incomplete LoRA entry for {base} (have {sorted(ab)})")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        w = plain[f"{base}.weight"]
        plain[f"{base}.weight"] = (w.float() + (alpha if alpha is not None else r) / r * (b @ a)).to(w.dtype)
    return plain, len(lora)


def _config(kind: str, text: TextConfig, vision: dict, projection_dim: int,
            clip_type: str = "vl") -> LanguageBindConfig:
    """A LanguageBind tower configuration; video adds temporal attention (and, with
    ``clip_type="vl_new"``, the V1.5 per-frame embeddings), audio its mel geometry."""
    vision = dict(vision, patch_size=14, image_size=224, hidden_act="gelu")
    if kind == "video":
        vision.update(add_time_attn=True, num_frames=8, clip_type=clip_type, tube_size=1)
    if kind == "audio":
        vision.update(num_mel_bins=112, target_length=1036)
    return LanguageBindConfig(text=text, vision=VisionConfig(**vision), projection_dim=projection_dim,
                              model_type=f"LanguageBind{kind.capitalize()}")


def tiny_config(kind: str, clip_type: str = "vl") -> LanguageBindConfig:
    """Tiny configurations of the five towers (text/vision width 32, 1 layer, 2 heads, projection 16);
    ``clip_type="vl_new"`` gives the V1.5 video layout."""
    text = TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      hidden_act="gelu")
    return _config(kind, text, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2), 16, clip_type)


def large_config(kind: str, clip_type: str = "vl") -> LanguageBindConfig:
    """The released Large configuration (ViT-L/14 vision, 768-wide text, projection 768);
    ``clip_type="vl_new"`` gives the V1.5 video layout."""
    text = TextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      hidden_act="gelu")
    return _config(kind, text, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16), 768, clip_type)


__all__ = ["LanguageBindConfig", "LanguageBindNet", "TextConfig", "VisionConfig", "build_languagebind",
           "large_config", "merge_lora", "tiny_config"]
