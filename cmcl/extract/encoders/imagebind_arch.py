"""The ImageBind network, written for inference, with the official checkpoint's parameter names.

The module tree reproduces the attribute names of upstream ``ImageBindModel`` so that
``imagebind_huge.pth`` (and UniBind's ``bind.*`` weights) load strictly:
``modality_preprocessors.<m>``, ``modality_trunks.<m>.blocks.N``, ``modality_heads.<m>`` and
``modality_postprocessors.<m>``. Only inference is supported: drop-path and dropout, which are
identities in eval mode, are left out (they hold no parameters), so the model can also be built on
the ``meta`` device to check a checkpoint's keys and shapes without reading its tensors.

Per-modality outputs follow upstream exactly, including the logit scaling of the postprocessors and
the mean over clips for 5-D+ inputs; callers renormalise (:class:`ImageBindEncoder` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: the six towers of the network (video and tactile use the vision tower).
TOWERS = ("vision", "text", "audio", "depth", "thermal", "imu")


@dataclass(frozen=True)
class Tower:
    """Width, depth and heads of one transformer tower."""

    embed_dim: int
    num_blocks: int
    num_heads: int


@dataclass(frozen=True)
class ImageBindConfig:
    """Architecture hyper-parameters; :data:`HUGE` is the released model, :data:`TINY` the test one."""

    out_embed_dim: int = 1024
    vision: Tower = Tower(1280, 32, 16)
    text: Tower = Tower(1024, 24, 16)
    audio: Tower = Tower(768, 12, 12)
    depth: Tower = Tower(384, 12, 8)
    thermal: Tower = Tower(768, 12, 12)
    imu: Tower = Tower(512, 6, 8)
    video_frames: int = 2
    kernel_size: tuple[int, int, int] = (2, 14, 14)
    image_size: int = 224
    context_length: int = 77
    vocab_size: int = 49408
    audio_kernel: int = 16
    audio_stride: int = 10
    audio_mel_bins: int = 128
    audio_frames: int = 204
    depth_kernel: int = 16
    thermal_kernel: int = 16
    imu_channels: int = 6
    imu_kernel: int = 8
    imu_length: int = 2000
    # fixed logit scales of the postprocessors (text's is learned)
    fixed_scales: dict = field(default_factory=lambda: {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0})

    def tower(self, name: str) -> Tower:
        return getattr(self, name)


HUGE = ImageBindConfig()
_T = Tower(32, 1, 2)
TINY = ImageBindConfig(out_embed_dim=32, vision=_T, text=_T, audio=_T, depth=_T, thermal=_T, imu=_T)
CONFIGS = {"huge": HUGE, "tiny": TINY}


# ------------------------------------------------------------------------------------ pieces
class _RepeatFrames(nn.Module):
    """(B,C,H,W) image -> (B,C,T,H,W) video of ``ntimes`` identical frames; videos pass through."""

    def __init__(self, ntimes: int) -> None:
        super().__init__()
        self.ntimes = ntimes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.ntimes, -1, -1)
        return x


class _PatchStem(nn.Module):
    """A projection (conv or linear) plus an optional LayerNorm, as named in the checkpoint."""

    def __init__(self, proj: nn.Module, norm: nn.Module | None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm_layer(x) if self.norm_layer is not None else x


class _PosEmbed(nn.Module):
    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * dim ** -0.5)


class _PatchPreprocessor(nn.Module):
    """CLS token + patch tokens + learned positions. ``stem_name`` is ``rgbt_stem`` or ``depth_stem``."""

    def __init__(self, stem: _PatchStem, stem_name: str, num_patches: int, dim: int) -> None:
        super().__init__()
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.pos_embedding_helper = _PosEmbed(num_patches + 1, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        tokens = getattr(self, self.stem_name)(x)
        pos = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] + 1 != pos.shape[1]:
            raise ValueError(f"input of shape {tuple(x.shape)} gives {tokens.shape[1]} patches, "
                             f"the model expects {pos.shape[1] - 1}")
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + pos, None, None


class _TextPreprocessor(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, dim) * 0.01)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("mask", mask)

    def forward(self, ids: torch.Tensor):
        tokens = self.token_embedding(ids) + self.pos_embed
        return tokens, self.mask, ids.argmax(dim=-1)  # EOT has the largest id


class _IMUPreprocessor(nn.Module):
    def __init__(self, stem: _PatchStem, kernel: int, length: int, dim: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.imu_stem = stem
        self.pos_embed = nn.Parameter(torch.randn(1, length // kernel + 1, dim) * 0.01)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)

    def forward(self, x: torch.Tensor):
        # (B, C, L) -> (B, L/k, C*k): each token is k consecutive samples of every channel
        x = x.unfold(-1, self.kernel, self.kernel).permute(0, 2, 1, 3)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(x))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embed, None, None


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm_1 x), then x + mlp(norm_2 x)."""

    def __init__(self, dim: int, heads: int, add_bias_kv: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class _Trunk(nn.Module):
    def __init__(self, tower: Tower, pre_ln: bool, add_bias_kv: bool) -> None:
        super().__init__()
        d = tower.embed_dim
        # index 1 upstream is a (parameter-free) layout change; we run batch-first instead
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(d, eps=1e-6) if pre_ln else nn.Identity(),
                                                   nn.Identity())
        self.blocks = nn.Sequential(*[_Block(d, tower.num_heads, add_bias_kv) for _ in range(tower.num_blocks)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.pre_transformer_layer(x)
        for blk in self.blocks:
            x = blk(x, mask)
        return x


class _SelectFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class _TextHead(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out, bias=False))

    def forward(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eos])


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class _LogitScale(nn.Module):
    def __init__(self, init: float, learnable: bool) -> None:
        super().__init__()
        value = torch.full((), math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0) * x


# ------------------------------------------------------------------------------------- model
class ImageBindNet(nn.Module):
    """ImageBind for inference; ``embed(tower, x)`` gives upstream's output for one modality."""

    def __init__(self, cfg: ImageBindConfig = HUGE) -> None:
        super().__init__()
        self.cfg = cfg
        v, a, d, t, i = cfg.vision, cfg.audio, cfg.depth, cfg.thermal, cfg.imu
        grid = cfg.image_size // cfg.kernel_size[1]
        frames = cfg.video_frames // cfg.kernel_size[0]
        audio_grid = ((cfg.audio_mel_bins - cfg.audio_kernel) // cfg.audio_stride + 1) * \
                     ((cfg.audio_frames - cfg.audio_kernel) // cfg.audio_stride + 1)
        pre = {
            "vision": _PatchPreprocessor(
                _PatchStem(nn.Sequential(_RepeatFrames(cfg.video_frames),
                                         nn.Conv3d(3, v.embed_dim, cfg.kernel_size, cfg.kernel_size, bias=False)),
                           None), "rgbt_stem", frames * grid * grid, v.embed_dim),
            "text": _TextPreprocessor(cfg.vocab_size, cfg.context_length, cfg.text.embed_dim),
            "audio": _PatchPreprocessor(
                _PatchStem(nn.Conv2d(1, a.embed_dim, cfg.audio_kernel, cfg.audio_stride, bias=False),
                           nn.LayerNorm(a.embed_dim)), "rgbt_stem", audio_grid, a.embed_dim),
            "depth": _PatchPreprocessor(
                _PatchStem(nn.Conv2d(1, d.embed_dim, cfg.depth_kernel, cfg.depth_kernel, bias=False),
                           nn.LayerNorm(d.embed_dim)), "depth_stem",
                (cfg.image_size // cfg.depth_kernel) ** 2, d.embed_dim),
            "thermal": _PatchPreprocessor(
                _PatchStem(nn.Conv2d(1, t.embed_dim, cfg.thermal_kernel, cfg.thermal_kernel, bias=False),
                           nn.LayerNorm(t.embed_dim)), "rgbt_stem",
                (cfg.image_size // cfg.thermal_kernel) ** 2, t.embed_dim),
            "imu": _IMUPreprocessor(
                _PatchStem(nn.Linear(cfg.imu_channels * cfg.imu_kernel, i.embed_dim, bias=False),
                           nn.LayerNorm(i.embed_dim)), cfg.imu_kernel, cfg.imu_length, i.embed_dim),
        }
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict({
            m: _Trunk(cfg.tower(m), pre_ln=(m == "vision"), add_bias_kv=m not in ("vision", "text"))
            for m in TOWERS
        })
        out = cfg.out_embed_dim
        heads: dict[str, nn.Module] = {"text": _TextHead(cfg.text.embed_dim, out)}
        for m in ("vision", "audio", "depth", "thermal"):
            dim = cfg.tower(m).embed_dim
            heads[m] = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), _SelectFirst(), nn.Linear(dim, out, bias=False))
        heads["imu"] = nn.Sequential(nn.LayerNorm(i.embed_dim, eps=1e-6), _SelectFirst(), nn.Identity(),
                                     nn.Linear(i.embed_dim, out, bias=False))
        self.modality_heads = nn.ModuleDict(heads)
        post: dict[str, nn.Module] = {"vision": _Normalize(),
                                      "text": nn.Sequential(_Normalize(), _LogitScale(1 / 0.07, True))}
        for m, scale in cfg.fixed_scales.items():
            post[m] = nn.Sequential(_Normalize(), _LogitScale(scale, False))
        self.modality_postprocessors = nn.ModuleDict(post)

    def embed(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """Upstream ``ImageBindModel.forward({tower: x})[tower]``.

        Inputs with 5 or more dimensions (video (B,S,C,T,H,W), audio (B,S,1,F,T)) are embedded
        per clip and averaged over the clip axis S, after the postprocessor, as upstream does.
        """
        clips = x.ndim >= 5
        if clips:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        tokens, mask, eos = self.modality_preprocessors[tower](x)
        h = self.modality_trunks[tower](tokens, mask)
        y = self.modality_heads[tower](h, eos) if tower == "text" else self.modality_heads[tower](h)
        y = self.modality_postprocessors[tower](y)
        if clips:
            y = y.reshape(b, s, -1).mean(dim=1)
        return y


def build_imagebind(cfg: ImageBindConfig, *, device: str | torch.device = "cpu", seed: int | None = 0) -> ImageBindNet:
    """Build the network (random weights) on ``device``; ``"meta"`` allocates nothing."""
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        net = ImageBindNet(cfg).eval()
    return net.requires_grad_(False)
