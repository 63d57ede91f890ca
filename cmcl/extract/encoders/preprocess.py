"""Media decoding and preprocessing, written with PIL, numpy and torch only.

These functions reproduce the upstream pipelines (torchvision transforms, pytorchvideo samplers,
torchaudio resampling and Kaldi filterbanks) without importing those libraries; each function says
which upstream behaviour it follows. Deviations are listed in ``docs/encoders.md``.

Raw items accepted everywhere: a path, or an in-memory value (a PIL image; an ``(array, rate)``
pair for audio (``array`` shaped (channels, samples) or (samples,)) and for video (``array`` shaped
(frames, H, W, 3) uint8, ``rate`` the frame rate); a float array of metres for depth).
"""

from __future__ import annotations

import math
import wave
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cmcl.errors import EncoderError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------ images
def open_image(item: Any, mode: str = "RGB") -> Image.Image:
    """A PIL image converted to ``mode`` (``"RGB"`` or ``"L"``)."""
    if isinstance(item, Image.Image):
        return item.convert(mode)
    try:
        with Image.open(item) as img:
            return img.convert(mode)
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{item}: cannot read image ({exc})") from None


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: the short side becomes ``size``, the long side ``int(size*long/short)``."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def pil_resize_short(img: Image.Image, size: int) -> Image.Image:
    """``transforms.Resize(size, BICUBIC)`` on a PIL image (torchvision calls PIL's own resize)."""
    w, h = img.size
    nh, nw = short_side_size(h, w, size)
    return img.resize((nw, nh), Image.BICUBIC)


def crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``CenterCrop`` offsets: ``int(round((H - size) / 2))`` (Python rounding)."""
    if h < size or w < size:
        raise EncoderError(f"cannot center-crop {size}x{size} from a {h}x{w} image")
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def pil_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top, left = crop_offsets(h, w, size)
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """``ToTensor``: HWC uint8 -> CHW float in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], channel_dim: int = 0) -> torch.Tensor:
    shape = [1] * x.ndim
    shape[channel_dim] = -1
    m = torch.tensor(mean, dtype=x.dtype).reshape(shape)
    s = torch.tensor(std, dtype=x.dtype).reshape(shape)
    return (x - m) / s


def tensor_resize_short(x: torch.Tensor, size: int, mode: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """torchvision ``Resize(size)`` on a float (..., H, W) tensor: ``F.interpolate``, no clamping."""
    h, w = x.shape[-2:]
    nh, nw = short_side_size(h, w, size)
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(1, -1, h, w), size=(nh, nw), mode=mode, align_corners=False,
                      antialias=antialias)
    return y.reshape(*lead, nh, nw)


def tensor_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = crop_offsets(h, w, size)
    return x[..., top:top + size, left:left + size]


def imagebind_image(item: Any, size: int = 224) -> torch.Tensor:
    """ImageBind vision: RGB, PIL bicubic short-side resize, center crop, CLIP normalise -> (3,S,S)."""
    img = pil_center_crop(pil_resize_short(open_image(item), size), size)
    return normalize(pil_to_tensor(img), CLIP_MEAN, CLIP_STD)


def unibind_thermal(item: Any, size: int = 224) -> torch.Tensor:
    """UniBind thermal: grey, PIL bicubic resize, center crop, normalise (0.5, 0.5) -> (1,S,S)."""
    img = pil_center_crop(pil_resize_short(open_image(item, "L"), size), size)
    return normalize(pil_to_tensor(img), (0.5,), (0.5,))


def languagebind_image(item: Any, size: int = 224, antialias: bool = False) -> torch.Tensor:
    """LanguageBind image/thermal: ToTensor, tensor bicubic resize, center crop, CLIP normalise."""
    x = tensor_resize_short(pil_to_tensor(open_image(item)), size, "bicubic", antialias)
    return normalize(tensor_center_crop(x, size), CLIP_MEAN, CLIP_STD)


# ------------------------------------------------------------------------------------- depth
def _is_8bit_image(item: Any) -> bool:
    if isinstance(item, (np.ndarray, Image.Image)) or Path(item).suffix == ".npy":
        return isinstance(item, Image.Image) and item.mode in ("L", "P", "RGB", "RGBA")
    try:
        with Image.open(item) as img:
            return img.mode in ("L", "P", "RGB", "RGBA")
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{item}: cannot read depth image ({exc})") from None


def read_depth(item: Any, png_scale: float = 1000.0, png8_max: float = 10.0) -> np.ndarray:
    """Depth in metres as float32 (H, W).

    A path ending in ``.npy`` (or an array) holds metres; a 16-bit image holds ``png_scale`` units
    per metre (millimetres by default); an 8-bit image holds ``value / 255 * png8_max`` metres (the
    quantisation of cmcl's NYUDv2 converter).
    """
    if isinstance(item, np.ndarray):
        return item.astype(np.float32)
    if not isinstance(item, Image.Image) and Path(item).suffix == ".npy":
        return np.load(item).astype(np.float32)
    try:
        img = item if isinstance(item, Image.Image) else Image.open(item)
        with img:
            eight = img.mode in ("L", "P", "RGB", "RGBA")
            arr = np.asarray(img.convert("L") if eight else img).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{item}: cannot read depth image ({exc})") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr / 255.0 * float(png8_max) if eight else arr / float(png_scale)


def imagebind_depth(item: Any, size: int = 224, mode: str = "auto", png_scale: float = 1000.0,
                    min_depth: float = 0.01, max_depth: float = 50.0, baseline: float = 0.075,
                    focal: float = 518.857901, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """ImageBind depth (no official loader) -> (1,S,S).

    ``mode="grey"``: the CMCL reference loader: an 8-bit depth image read as grey, PIL bicubic
    short-side resize, center crop, /255 (no disparity, no normalisation).
    ``mode="disparity"``: metres (16-bit PNG / ``png_scale``, ``.npy``, array) -> clip to
    [min, max] -> ``baseline*focal/depth`` -> bicubic resize -> center crop -> ``(x-mean)/std``.
    ``mode="auto"``: ``grey`` for 8-bit image files, ``disparity`` otherwise.
    """
    if mode not in ("auto", "grey", "disparity"):
        raise EncoderError(f"unknown depth mode {mode!r} (auto, grey or disparity)")
    if mode == "grey" or (mode == "auto" and _is_8bit_image(item)):
        img = pil_center_crop(pil_resize_short(open_image(item, "L"), size), size)
        return pil_to_tensor(img)
    depth = np.clip(read_depth(item, png_scale), min_depth, max_depth)
    disparity = torch.from_numpy(baseline * focal / depth)[None]
    x = tensor_center_crop(tensor_resize_short(disparity, size, "bicubic"), size)
    return (x - mean) / std


def languagebind_depth(item: Any, size: int = 224, png_scale: float = 1000.0, min_depth: float = 0.01,
                       max_depth: float = 10.0, antialias: bool = False, png8_max: float = 10.0) -> torch.Tensor:
    """LanguageBind depth: metres (see :func:`read_depth`) clipped to [min, max], /max, three
    channels, tensor bicubic resize, center crop, CLIP normalise -> (3,S,S)."""
    depth = np.clip(read_depth(item, png_scale, png8_max), min_depth, max_depth) / max_depth
    x = torch.from_numpy(depth)[None].expand(3, -1, -1)
    x = tensor_center_crop(tensor_resize_short(x, size, "bicubic", antialias), size)
    return normalize(x, CLIP_MEAN, CLIP_STD)


# ---------------------------------------------------------------------------------------- imu
def imu_signal(item: Any, length: int = 2000, channels: int = 6) -> torch.Tensor:
    """IMU (acc + gyro) as (channels, length): first ``length`` samples, zero-padded; no scaling."""
    arr = np.load(item) if not isinstance(item, np.ndarray) else item
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2 or channels not in arr.shape:
        raise EncoderError(f"{item if not isinstance(item, np.ndarray) else 'imu array'}: expected "
                           f"({channels}, samples), got shape {arr.shape}")
    if arr.shape[0] != channels:
        arr = arr.T
    out = np.zeros((channels, length), dtype=np.float32)
    n = min(length, arr.shape[1])
    out[:, :n] = arr[:, :n]
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------- video
def clip_timepoints(duration: float | Fraction, clip_duration: float, clips: int) -> list[tuple[Fraction, Fraction]]:
    """pytorchvideo ``ConstantClipsPerVideoSampler``: clip k starts at ``k*max(D - d, 0)/clips``.

    Upstream divides by ``clips`` (not ``clips - 1``), so the last clip ends before the video does.
    """
    span = Fraction(max(Fraction(duration) - Fraction(clip_duration), 0))
    step = span / clips
    return [(step * k, step * k + Fraction(clip_duration)) for k in range(clips)]


def uniform_indices(n: int, k: int) -> list[int]:
    """pytorchvideo ``UniformTemporalSubsample``: ``linspace(0, n-1, k)`` truncated to ints."""
    return torch.linspace(0, n - 1, k).clamp(0, n - 1).long().tolist()


def spread_indices(n: int, k: int) -> list[int]:
    """LanguageBind: ``np.linspace(0, n-1, k, dtype=int)`` over the whole video."""
    return np.linspace(0, n - 1, k, dtype=int).tolist()


def short_side_scale(x: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo ``ShortSideScale`` on (C,T,H,W): bilinear, long side ``floor(long/short*size)``."""
    c, t, h, w = x.shape
    if w < h:
        nh, nw = int(math.floor(h / w * size)), size
    else:
        nh, nw = size, int(math.floor(w / h * size))
    return F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)


def three_crops(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """ImageBind ``SpatialCrop(num_crops=3)``: start, centre and end crops along the long side
    (centre offsets use ``ceil``)."""
    h, w = x.shape[-2:]
    crops = []
    for idx in range(3):
        y, xo = int(math.ceil((h - size) / 2)), int(math.ceil((w - size) / 2))
        if h > w:
            y = 0 if idx == 0 else (h - size if idx == 2 else y)
        else:
            xo = 0 if idx == 0 else (w - size if idx == 2 else xo)
        crops.append(x[..., y:y + size, xo:xo + size])
    return crops


class DecodedVideo:
    """Frames (T, H, W, 3) uint8 with their timestamps in seconds and the stream duration."""

    def __init__(self, frames: np.ndarray, times: np.ndarray, duration: float) -> None:
        self.frames, self.times, self.duration = frames, times, duration

    def clip(self, start: Fraction, end: Fraction) -> np.ndarray:
        """Frames whose timestamp lies in ``[start, end)`` (at least the nearest one)."""
        sel = np.flatnonzero((self.times >= float(start)) & (self.times < float(end)))
        if len(sel) == 0:
            sel = [int(np.argmin(np.abs(self.times - float(start))))]
        return self.frames[sel]


def decode_video(item: Any) -> DecodedVideo:
    """Decode a video with PyAV (``pip install "cmcl[media]"``), or wrap an ``(frames, fps)`` pair."""
    if isinstance(item, tuple):
        frames, fps = item
        frames = np.asarray(frames, dtype=np.uint8)
        times = np.asarray([float(Fraction(i) / Fraction(fps)) for i in range(len(frames))])
        return DecodedVideo(frames, times, len(frames) / float(fps))
    try:
        import av
    except ImportError:
        raise EncoderError(f"{item}: decoding video files needs PyAV; install it with "
                           f"pip install 'cmcl[media]'") from None
    try:
        with av.open(str(item)) as container:
            stream = container.streams.video[0]
            base = Fraction(stream.time_base) if stream.time_base else None
            rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(30)
            frames, stamps = [], []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                # exact rational timestamps, so clip boundaries compare like upstream's
                stamps.append(frame.pts * base if frame.pts is not None and base else len(stamps) / rate)
            if stream.duration is not None and base:
                duration = float(stream.duration * base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = float(stamps[-1] - stamps[0] + 1 / rate) if stamps else 0.0
    except (OSError, ValueError, av.error.FFmpegError) as exc:  # type: ignore[attr-defined]
        raise EncoderError(f"{item}: cannot decode video ({exc})") from None
    if not frames:
        raise EncoderError(f"{item}: no video frames")
    times = np.asarray([float(t - stamps[0]) for t in stamps], dtype=np.float64)
    return DecodedVideo(np.stack(frames), times, duration)


def imagebind_video(item: Any, size: int = 224, clip_duration: float = 2.0, clips: int = 5,
                    frames_per_clip: int = 2) -> torch.Tensor:
    """ImageBind video -> (clips*3, 3, frames_per_clip, S, S): per clip, uniform frames, /255,
    short-side bilinear scale, CLIP normalise, then three spatial crops."""
    video = decode_video(item)
    out = []
    for start, end in clip_timepoints(video.duration, clip_duration, clips):
        frames = video.clip(start, end)
        frames = frames[uniform_indices(len(frames), frames_per_clip)]
        x = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0  # (C,T,H,W)
        x = normalize(short_side_scale(x, size), CLIP_MEAN, CLIP_STD)
        out.extend(three_crops(x, size))
    return torch.stack(out)


def languagebind_video(item: Any, size: int = 224, num_frames: int = 8) -> torch.Tensor:
    """LanguageBind video -> (3, T, S, S): T frames spread over the whole video, /255, CLIP
    normalise, short-side bilinear scale, center crop (upstream's random flip is omitted)."""
    video = decode_video(item)
    frames = video.frames[spread_indices(len(video.frames), num_frames)]
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0
    x = short_side_scale(normalize(x, CLIP_MEAN, CLIP_STD), size)
    return tensor_center_crop(x, size).contiguous()


# ------------------------------------------------------------------------------------- audio
_PCM_SCALE = {"u8": None, "s16": 32768.0, "s32": float(1 << 31), "flt": 1.0, "dbl": 1.0}


def _read_audio_av(path: str) -> tuple[torch.Tensor, int]:
    """Decode the first audio stream with PyAV into (channels, samples) float32."""
    import av

    chunks = []
    with av.open(path) as container:
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate)
        for frame in container.decode(stream):
            arr = frame.to_ndarray()
            fmt = frame.format.name.rstrip("p")
            layout = frame.layout
            channels = layout.nb_channels if hasattr(layout, "nb_channels") else len(layout.channels)
            if not frame.format.is_planar:  # packed: (1, samples * channels)
                arr = arr.reshape(-1, channels).T
            if fmt == "u8":
                arr = (arr.astype(np.float32) - 128.0) / 128.0
            elif fmt in _PCM_SCALE:
                arr = arr.astype(np.float32) / _PCM_SCALE[fmt]
            else:
                raise EncoderError(f"{path}: unsupported audio sample format {frame.format.name}")
            chunks.append(arr)
    if not chunks:
        raise EncoderError(f"{path}: no audio samples")
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks, axis=1))), rate


def read_audio(item: Any) -> tuple[torch.Tensor, int]:
    """(channels, samples) float32 in [-1, 1] and the sample rate.

    Tries ``soundfile`` (wav, flac, ogg, mp3 with libsndfile >= 1.1), then PyAV (any format FFmpeg
    reads), then Python's ``wave`` for PCM WAV; ``pip install "cmcl[media]"`` installs the first two.
    """
    if isinstance(item, tuple):
        data, rate = item
        x = torch.as_tensor(np.asarray(data, dtype=np.float32))
        return (x[None] if x.ndim == 1 else x), int(rate)
    path = str(item)
    problems = []
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        try:
            data, rate = soundfile.read(path, dtype="float32", always_2d=True)
            return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)
        except Exception as exc:  # soundfile raises its own error type
            problems.append(f"soundfile: {exc}")
    try:
        import av  # noqa: F401
    except ImportError:
        av = None
    if av is not None:
        try:
            return _read_audio_av(path)
        except EncoderError:
            raise
        except Exception as exc:  # PyAV raises its own error types
            problems.append(f"PyAV: {exc}")
    if not path.lower().endswith((".wav", ".wave")):
        raise EncoderError(f"{path}: cannot read audio ({'; '.join(problems) or 'neither soundfile nor PyAV is installed'}); "
                           f"pip install 'cmcl[media]' reads formats other than PCM WAV")
    try:
        with wave.open(path, "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise EncoderError(f"{path}: cannot read audio with the wave module ({exc}); install "
                           f"soundfile (pip install 'cmcl[media]') for other formats") from None
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        data = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float32) / float(1 << 23)
    else:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    return torch.from_numpy(data.reshape(-1, channels).T.copy()), rate


def _sinc_kernel(orig: int, new: int, width_zeros: int, rolloff: float, dtype: torch.dtype):
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + idx
    t = (t * base).clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return kernel * window * (base / orig), width


def resample(x: torch.Tensor, orig: int, new: int, lowpass_width: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited sinc resampling with a Hann window, as ``torchaudio.functional.resample``'s
    defaults (``sinc_interp_hann``, width 6, rolloff 0.99); output length ``ceil(new*n/orig)``."""
    if orig == new:
        return x
    g = math.gcd(int(orig), int(new))
    o, n = int(orig) // g, int(new) // g
    kernel, width = _sinc_kernel(o, n, lowpass_width, rolloff, x.dtype)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    length = flat.shape[-1]
    y = F.conv1d(F.pad(flat, (width, width + o))[:, None], kernel, stride=o)
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(n * length / o)]
    return y.reshape(*shape[:-1], y.shape[-1])


def mel_banks(num_bins: int, fft_size: int, rate: float, low: float = 20.0, high: float = 0.0) -> torch.Tensor:
    """Kaldi triangular mel filters on the mel scale ``1127 ln(1 + f/700)``: (num_bins, fft_size//2)."""
    nyquist = 0.5 * rate
    if high <= 0.0:
        high += nyquist
    bin_width = rate / fft_size

    def mel(f):
        return 1127.0 * torch.log(1.0 + f / 700.0) if isinstance(f, torch.Tensor) else 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(low), mel(high)
    delta = (hi - lo) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left, centre, right = lo + b * delta, lo + (b + 1.0) * delta, lo + (b + 2.0) * delta
    m = mel(bin_width * torch.arange(fft_size // 2)).unsqueeze(0)
    up = (m - left) / (centre - left)
    down = (right - m) / (right - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def kaldi_fbank(x: torch.Tensor, rate: int, num_mel_bins: int, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, preemph: float = 0.97, low_freq: float = 20.0) -> torch.Tensor:
    """Log mel filterbank of channel 0, as ``torchaudio.compliance.kaldi.fbank`` with
    ``htk_compat=True, use_energy=False, window_type="hanning", dither=0`` and its defaults
    (remove DC, pre-emphasis, power spectrum, snip edges, padded FFT) -> (frames, num_mel_bins)."""
    wav = x[0] if x.ndim == 2 else x
    size = int(rate * frame_length_ms * 0.001)
    shift = int(rate * frame_shift_ms * 0.001)
    fft_size = 1 << (size - 1).bit_length()
    if wav.shape[0] < size:
        raise EncoderError(f"audio of {wav.shape[0]} samples is shorter than one {frame_length_ms} ms frame")
    frames = wav.unfold(0, size, shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemph * prev
    frames = frames * torch.hann_window(size, periodic=False, dtype=frames.dtype)
    frames = F.pad(frames, (0, fft_size - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = F.pad(mel_banks(num_mel_bins, fft_size, rate, low_freq), (0, 1)).to(power.dtype)
    energies = power @ banks.T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()


def imagebind_audio(item: Any, rate: int = 16000, mel_bins: int = 128, target_frames: int = 204,
                    clip_duration: float = 2.0, clips: int = 3, mean: float = -4.268,
                    std: float = 9.138) -> torch.Tensor:
    """ImageBind audio -> (clips, 1, mel_bins, target_frames): resample, clip sampling, per-clip
    mean removal (in place on the shared waveform, as upstream), fbank, pad/crop, normalise."""
    wav, sr = read_audio(item)
    wav = resample(wav.float(), sr, rate).clone()
    duration = wav.shape[-1] / rate
    out = []
    for start, end in clip_timepoints(duration, clip_duration, clips):
        seg = wav[:, int(start * rate): int(end * rate)]
        seg -= seg.mean()  # a view: overlapping clips see earlier shifts, as upstream
        spec = kaldi_fbank(seg, rate, mel_bins).T  # (bins, frames)
        pad = target_frames - spec.shape[1]
        spec = F.pad(spec, (0, pad)) if pad > 0 else spec[:, :target_frames]
        out.append(((spec - mean) / std)[None])
    return torch.stack(out)


def languagebind_audio(item: Any, rate: int = 16000, mel_bins: int = 112, target_frames: int = 1036,
                       mean: float = -4.2677393, std: float = 4.5689974) -> torch.Tensor:
    """LanguageBind audio -> (3, mel_bins, target_frames), as upstream ``AudioTransform``.

    Channel 0 is resampled. A waveform longer than ``target_frames`` frames of 10 ms gives three
    fbank chunks starting at the first index of each third of the valid starts (upstream's fixed
    choice); a shorter one is repeated ``int(max_len/len)`` times, zero-padded to ``max_len``
    samples and its fbank used three times. Each fbank follows in-place mean removal; frames are
    zero-padded or cut to ``target_frames``; then ``(x - mean) / std``.
    """
    wav, sr = read_audio(item)
    wav = resample(wav.float(), sr, rate)[0].clone()
    max_len = target_frames * rate // 100

    def mel(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean()
        return kaldi_fbank(x, rate, mel_bins)  # (frames, bins)

    if wav.shape[-1] > max_len:
        spec = mel(wav)
        ranges = np.array_split(np.arange(spec.shape[0] - target_frames + 1), 3)
        starts = [int(r[0]) if len(r) else 0 for r in ranges]
        fused = torch.stack([spec[s:s + target_frames] for s in starts])
    else:
        if wav.shape[-1] < max_len:
            wav = wav.repeat(int(max_len / wav.shape[-1]))
            wav = F.pad(wav, (0, max_len - wav.shape[-1]))
        spec = mel(wav)
        fused = torch.stack([spec, spec, spec])
    pad = target_frames - fused.shape[1]
    fused = F.pad(fused, (0, 0, 0, pad)) if pad > 0 else fused[:, :target_frames]
    return (fused.transpose(1, 2) - mean) / std
