"""Preprocessing of every modality against golden values and independent references."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cmcl.errors import EncoderError
from cmcl.extract.encoders import preprocess as P
from cmcl.extract.encoders.tokenizer import (
    ClipTokenizer,
    byte_to_unicode,
    clean_text,
    hf_basic_clean,
    hf_clean_text,
)
from tests.encoder_fixtures import (
    DOG,
    EOT,
    HELLO,
    SOT,
    video_frames,
    write_bpe_gz,
    write_depth_png,
    write_hf_tokenizer,
    write_image,
    write_wav,
)

MEAN = torch.tensor(P.CLIP_MEAN)
STD = torch.tensor(P.CLIP_STD)


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_golden_ids_and_padding(tmp_path):
    tok = ClipTokenizer.from_bpe_gz(write_bpe_gz(tmp_path / "bpe.txt.gz"))
    ids = tok("Hello  DOG")
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert ids[:4].tolist() == [SOT, HELLO, DOG, EOT]
    assert ids[4:].eq(0).all()
    # no merges apply: 'h' is byte symbol 104-33, 'i</w>' is 256 + 105-33, '!</w>' is 256 + 0
    assert tok("hi!")[:5].tolist() == [SOT, 71, 256 + 72, 256, EOT]
    # HTML entities are unescaped twice: "&amp;amp;" -> "&"
    assert tok("&amp;amp;")[:3].tolist() == [SOT, 256 + ord("&") - 33, EOT]


def test_tokenizer_truncation_keeps_eot(tmp_path):
    tok = ClipTokenizer.from_bpe_gz(write_bpe_gz(tmp_path / "bpe.txt.gz"))
    ids = tok("dog " * 100)
    assert ids[0] == SOT and ids[-1] == EOT
    assert ids[1:76].eq(DOG).all()
    assert int(ids.argmax()) == 76


def test_hf_vocab_gives_the_same_ids_with_eot_padding(tmp_path):
    gz = ClipTokenizer.from_bpe_gz(write_bpe_gz(tmp_path / "bpe.txt.gz"))
    folder = write_hf_tokenizer(tmp_path / "tok")
    hf = ClipTokenizer.from_hf_files(folder / "vocab.json", folder / "merges.txt")
    for text in ["hello dog", "Hello, wörld! 123", "dog " * 90]:
        a, b = gz(text), hf(text)
        n = int((a != 0).sum())
        assert a[:n].tolist() == b[:n].tolist()
        assert b[n:].eq(EOT).all() and hf.pad_id == EOT
    # argmax (the EOS pooling index) is the same for both paddings
    assert int(gz("hello dog").argmax()) == int(hf("hello dog").argmax()) == 3


def byte_symbol_ids(tok, ch):
    """Ids of the byte symbols of one character (no merges apply in the tiny vocabulary)."""
    table = byte_to_unicode()
    syms = [table[b] for b in ch.encode("utf-8")]
    return [tok.encoder[s] for s in syms[:-1]] + [tok.encoder[syms[-1] + "</w>"]]


ENTITY_TEXTS = ["<b>Tom &amp; Jerry</b>", "R&D &notes", "5 &times 3", "&copy 2020"]


def test_each_backbone_cleans_text_as_its_upstream_tokenizer():
    # ImageBind/UniBind (OpenAI SimpleTokenizer): HTML unescaped twice, entities without ';' too
    assert [clean_text(t) for t in ENTITY_TEXTS] == ["<b>tom & jerry</b>", "r&d \u00aces", "5 \u00d7 3",
                                                     "\u00a9 2020"]
    # LanguageBind (HF CLIPTokenizer): ftfy only, which leaves text holding '<' and entities
    # without ';' alone
    assert [hf_clean_text(t) for t in ENTITY_TEXTS] == ["<b>tom &amp; jerry</b>", "r&d &notes", "5 &times 3",
                                                        "&copy 2020"]
    assert hf_clean_text("Tom &amp;  Jerry\n") == "tom & jerry"  # ftfy unescapes where it is safe
    assert hf_clean_text("\u00c3\u00a9t\u00e9") == "\u00e9t\u00e9"  # mojibake repaired
    # without ftfy HF uses BERT's basic clean-up: no unescaping, no repair, CJK ideographs spaced,
    # control and format characters dropped, NFC
    assert hf_clean_text("Tom &amp; Jerry", use_ftfy=False) == "tom &amp; jerry"
    assert hf_basic_clean("Caf\u0065\u0301 \u6771\u4eac\u00a0x\x07y\u200bz\tQ") == "caf\u00e9 \u6771 \u4eac xyz q"


def test_hf_cleaning_splits_at_special_tokens_first(tmp_path):
    folder = write_hf_tokenizer(tmp_path / "tok")
    hf = ClipTokenizer.from_hf_files(folder / "vocab.json", folder / "merges.txt")
    gz = ClipTokenizer.from_bpe_gz(write_bpe_gz(tmp_path / "bpe.txt.gz"))
    assert (hf.cleaning, gz.cleaning) == ("hf", "openai")
    amp = [256 + ord("&") - 33]
    assert gz("&amp;amp;")[:3].tolist() == [SOT] + amp + [EOT]
    assert hf("&amp;amp;")[:3].tolist() == [SOT] + amp + [EOT]  # ftfy unescapes repeatedly where safe
    assert int(gz("5 &times 3")[2]) == byte_symbol_ids(gz, "\u00d7")[0]  # "5 × 3"
    assert hf("5 &times 3")[:3].tolist() == [SOT, 256 + ord("5") - 33] + amp
    # special tokens are cut out before cleaning, so "<" in one piece does not stop ftfy in another
    assert hf("hello<|endoftext|>dog")[:5].tolist() == [SOT, HELLO, EOT, DOG, EOT]
    assert hf("<b> &amp;<|endoftext|>&amp;").tolist() == hf("<b> &amp;<|endoftext|>&").tolist()
    assert hf("<b> &amp;<|endoftext|>&amp;").tolist() != hf("<b> &<|endoftext|>&amp;").tolist()
    with pytest.raises(EncoderError, match="unknown tokenizer cleaning"):
        ClipTokenizer(hf.encoder, [], cleaning="bert")


def test_tokenizer_is_picklable_and_rejects_bad_files(tmp_path):
    tok = ClipTokenizer.from_bpe_gz(write_bpe_gz(tmp_path / "bpe.txt.gz"))
    assert pickle.loads(pickle.dumps(tok))("dog").tolist() == tok("dog").tolist()
    bad = tmp_path / "bad.txt"
    bad.write_text("header\na b c\n")
    with pytest.raises(EncoderError, match="not a BPE merge list"):
        ClipTokenizer.from_bpe_gz(bad)


# ------------------------------------------------------------------------------ images
def test_resize_and_crop_arithmetic_matches_torchvision_rules():
    assert P.short_side_size(480, 640, 224) == (224, 298)  # int(224*640/480) = int(298.67)
    assert P.short_side_size(640, 480, 224) == (298, 224)
    assert P.short_side_size(300, 300, 224) == (224, 224)
    assert P.crop_offsets(224, 298, 224) == (0, 37)
    assert P.crop_offsets(224, 225, 224) == (0, 0)  # round(0.5) == 0 (banker's rounding), as torchvision
    assert P.crop_offsets(224, 227, 224) == (0, 2)  # round(1.5) == 2
    with pytest.raises(EncoderError):
        P.crop_offsets(100, 300, 224)


def test_imagebind_image_uniform_colour_is_exact(tmp_path):
    path = tmp_path / "c.png"
    Image.new("RGB", (300, 200), (255, 128, 0)).save(path)
    x = P.imagebind_image(path)
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([255, 128, 0]) / 255.0 - MEAN) / STD
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-6)
    assert torch.allclose(x.amax(dim=(1, 2)), x.amin(dim=(1, 2)))


def test_imagebind_image_equals_pil_reference(tmp_path):
    path = write_image(tmp_path / "a.png", size=(64, 48))
    x = P.imagebind_image(path)
    ref = Image.open(path).convert("RGB").resize((298, 224), Image.BICUBIC).crop((37, 0, 261, 224))
    ref = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(x, (ref - MEAN[:, None, None]) / STD[:, None, None], atol=1e-6)


def test_languagebind_image_uses_tensor_bicubic_without_clamp(tmp_path):
    path = write_image(tmp_path / "a.png", size=(64, 48))
    x = P.languagebind_image(path)
    assert x.shape == (3, 224, 224)
    raw = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)
    ref = torch.nn.functional.interpolate(raw[None], size=(224, 298), mode="bicubic", align_corners=False)[0]
    ref = ref[:, :, 37:261]
    assert torch.allclose(x, (ref - MEAN[:, None, None]) / STD[:, None, None], atol=1e-5)
    # bicubic overshoot is kept (no clamp to [0, 1]) on random noise
    assert ((x * STD[:, None, None] + MEAN[:, None, None]) > 1.0).any()
    y = P.languagebind_image(path, antialias=True)
    assert not torch.allclose(x, y)


def test_thermal_is_grey_and_normalised_to_half(tmp_path):
    path = tmp_path / "t.png"
    Image.new("L", (320, 240), 51).save(path)
    x = P.unibind_thermal(path)
    assert x.shape == (1, 224, 224)
    assert torch.allclose(x, torch.full_like(x, (51 / 255 - 0.5) / 0.5), atol=1e-6)


def test_depth_to_disparity_and_languagebind_depth(tmp_path):
    png = write_depth_png(tmp_path / "d.png", metres=2.0)
    x = P.imagebind_depth(png)
    assert x.shape == (1, 224, 224)
    assert torch.allclose(x, torch.full_like(x, 0.075 * 518.857901 / 2.0), rtol=1e-5)
    assert torch.allclose(P.imagebind_depth(np.full((30, 40), 2.0, np.float32)), x)
    far = P.imagebind_depth(np.full((30, 40), 500.0, np.float32))  # clipped at 50 m
    assert torch.allclose(far, torch.full_like(far, 0.075 * 518.857901 / 50.0), rtol=1e-5)
    lb = P.languagebind_depth(png)
    assert lb.shape == (3, 224, 224)
    expected = (0.2 - MEAN) / STD  # 2 m / max 10 m
    assert torch.allclose(lb.mean(dim=(1, 2)), expected, atol=1e-5)


def test_imu_crop_and_pad():
    x = P.imu_signal(np.ones((6, 2500), np.float32))
    assert x.shape == (6, 2000) and x.eq(1).all()
    y = P.imu_signal(np.ones((1500, 6), np.float32))  # (samples, channels) is transposed
    assert y.shape == (6, 2000) and y[:, :1500].eq(1).all() and y[:, 1500:].eq(0).all()
    with pytest.raises(EncoderError):
        P.imu_signal(np.ones((5, 100), np.float32))


# ------------------------------------------------------------------------------ video
def test_clip_sampler_divides_by_clip_count():
    starts = [float(s) for s, _ in P.clip_timepoints(10, 2, 5)]
    assert starts == pytest.approx([0, 1.6, 3.2, 4.8, 6.4])
    assert all(float(e - s) == 2 for s, e in P.clip_timepoints(10, 2, 5))
    assert [float(s) for s, _ in P.clip_timepoints(1.5, 2, 3)] == [0, 0, 0]


def test_frame_index_rules():
    assert P.uniform_indices(20, 2) == [0, 19]
    assert P.uniform_indices(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert P.spread_indices(100, 8) == [0, 14, 28, 42, 56, 70, 84, 99]


def test_short_side_scale_and_three_crops():
    x = torch.arange(240 * 320, dtype=torch.float32).reshape(1, 1, 240, 320)
    assert P.short_side_scale(torch.zeros(3, 2, 48, 64), 224).shape == (3, 2, 224, 298)
    assert P.short_side_scale(torch.zeros(3, 2, 64, 48), 224).shape == (3, 2, 298, 224)
    crops = P.three_crops(x, 224)
    assert [int(c[0, 0, 0, 0]) % 320 for c in crops] == [0, 48, 96]
    assert all(int(c[0, 0, 0, 0]) // 320 == 8 for c in crops)  # ceil(16/2) rows down
    tall = P.three_crops(x.transpose(-1, -2).contiguous(), 224)
    # element [r, c] of the transpose is r + 320 c: rows start at 0, 48, 96; columns at ceil(16/2)
    assert [int(c[0, 0, 0, 0]) for c in tall] == [8 * 320, 8 * 320 + 48, 8 * 320 + 96]


def test_imagebind_video_samples_the_expected_frames():
    frames, fps = video_frames(60, 10.0)  # 6 s; frame i has value 4*i
    x = P.imagebind_video((frames, fps))
    assert x.shape == (15, 3, 2, 224, 224)
    # clip k covers [0.8k, 0.8k + 2): frames 8k .. 8k+19; two frames: first and last
    for k in range(5):
        for crop in range(3):
            got = x[3 * k + crop, 0, :, 0, 0] * STD[0] + MEAN[0]
            want = torch.tensor([4 * (8 * k), 4 * (8 * k + 19)]) / 255.0
            assert torch.allclose(got, want, atol=1e-5)


def test_languagebind_video_spreads_frames_over_the_video():
    frames, fps = video_frames(60, 10.0)
    x = P.languagebind_video((frames, fps))
    assert x.shape == (3, 8, 224, 224)
    got = x[0, :, 100, 100] * STD[0] + MEAN[0]
    want = torch.tensor([4 * i for i in np.linspace(0, 59, 8, dtype=int)]) / 255.0
    assert torch.allclose(got, want, atol=1e-5)


def test_video_file_without_pyav_or_unreadable_is_a_clear_error(tmp_path):
    bad = tmp_path / "v.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(EncoderError, match="v.mp4"):
        P.imagebind_video(bad)


# ------------------------------------------------------------------------------ audio
def test_wav_reader_scales_to_unit_range(tmp_path):
    x, rate = P.read_audio(write_wav(tmp_path / "a.wav", 0.5, 8000, channels=2))
    assert rate == 8000 and x.shape == (2, 4000)
    assert x.abs().max() == pytest.approx(0.5, abs=1e-3)


def test_resample_length_and_band_limited_accuracy():
    rate, new = 44100, 16000
    t = torch.arange(rate) / rate
    x = torch.sin(2 * math.pi * 440 * t)[None]
    y = P.resample(x, rate, new)
    assert y.shape == (1, math.ceil(new * rate / rate))
    ref = torch.sin(2 * math.pi * 440 * torch.arange(y.shape[1]) / new)
    assert (y[0, 200:-200] - ref[200:-200]).abs().max() < 2e-3
    assert P.resample(x, 16000, 16000) is x
    # a tone above the new Nyquist frequency is removed
    hi = torch.sin(2 * math.pi * 12000 * t)[None]
    assert P.resample(hi, rate, new)[0, 200:-200].abs().max() < 0.05


def _fbank_reference(x: np.ndarray, rate: int, bins: int) -> np.ndarray:
    """Kaldi fbank written independently in float64 numpy (loops, explicit formulas)."""
    size, shift, nfft = int(rate * 0.025), int(rate * 0.010), 512
    n = 1 + (len(x) - size) // shift
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
    lo, hi = mel(20.0), mel(rate / 2)
    delta = (hi - lo) / (bins + 1)
    fmel = mel(np.arange(nfft // 2) * rate / nfft)
    banks = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        l, c, r = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        for k in range(nfft // 2):
            if l < fmel[k] < r:
                banks[b, k] = (fmel[k] - l) / (c - l) if fmel[k] <= c else (r - fmel[k]) / (r - c)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))
    out = np.zeros((n, bins))
    for i in range(n):
        f = x[i * shift: i * shift + size].astype(np.float64)
        f = f - f.mean()
        f = np.concatenate([[f[0] - 0.97 * f[0]], f[1:] - 0.97 * f[:-1]])
        spec = np.abs(np.fft.rfft(f * window, nfft)) ** 2
        out[i] = np.log(np.maximum(banks @ spec, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("bins", [128, 112, 80])
def test_kaldi_fbank_matches_independent_reference(bins):
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(16000 // 4) + 0.3 * np.sin(np.arange(4000) * 0.2)).astype(np.float32)
    ours = P.kaldi_fbank(torch.from_numpy(x), 16000, bins).numpy()
    ref = _fbank_reference(x, 16000, bins)
    assert ours.shape == (1 + (4000 - 400) // 160, bins) == ref.shape
    assert np.abs(ours - ref).max() < 2e-3


def test_fbank_tone_peaks_in_the_right_mel_bin():
    t = torch.arange(16000) / 16000
    spec = P.kaldi_fbank(torch.sin(2 * math.pi * 1000 * t), 16000, 128)
    mel = lambda f: 1127.0 * math.log(1 + f / 700)
    delta = (mel(8000) - mel(20)) / 129
    centre_bin = round((mel(1000) - mel(20)) / delta) - 1
    assert abs(int(spec.mean(0).argmax()) - centre_bin) <= 1


def test_imagebind_audio_shape_padding_and_normalisation(tmp_path):
    two = P.imagebind_audio(write_wav(tmp_path / "a.wav", 2.0, 44100))
    assert two.shape == (3, 1, 128, 204)
    # 2 s gives 198 frames; the 6 zero frames become (0 + 4.268) / 9.138 after normalisation
    assert torch.allclose(two[:, :, :, 198:], torch.full((3, 1, 128, 6), 4.268 / 9.138))
    assert not torch.allclose(two[:, :, :, 197], torch.full((3, 1, 128), 4.268 / 9.138))
    five = P.imagebind_audio(write_wav(tmp_path / "b.wav", 5.0, 16000))
    assert five.shape == (3, 1, 128, 204)
    # a pure tone: the three clips hold the same spectrum
    assert torch.allclose(five[0, :, :, :190], five[2, :, :, :190], atol=1e-3)


def test_languagebind_audio_short_and_long(tmp_path):
    short = P.languagebind_audio(write_wav(tmp_path / "s.wav", 3.0, 16000))
    assert short.shape == (3, 112, 1036)
    # the padded waveform gives 1034 frames; 2 zero frames follow, then (x - mean) / std
    assert torch.allclose(short[:, :, 1034:], torch.full((3, 112, 2), 4.2677393 / 4.5689974))
    assert torch.equal(short[0], short[1])
    long = P.languagebind_audio(write_wav(tmp_path / "l.wav", 12.0, 16000, freq=300))
    assert long.shape == (3, 112, 1036)
    assert not torch.isnan(long).any()


# Golden values computed once with torchaudio 2.11's own resample and compliance.kaldi.fbank
# (pure-torch code run with a stand-in torchaudio module; our implementation matched them to
# 1.2e-7 for resampling and exactly for the filterbank at 128, 112 and 80 bins).
def _golden_signal() -> torch.Tensor:
    rng = np.random.default_rng(0)
    x = 0.1 * rng.standard_normal(44100) + 0.3 * np.sin(np.arange(44100) * 0.05)
    return torch.from_numpy(x.astype(np.float32))[None]


def test_resample_matches_torchaudio_golden_values():
    y = P.resample(_golden_signal(), 44100, 16000)
    assert y.shape == (1, 16000)
    want = [0.01998630352318287, 0.03925684839487076, 0.22172199189662933, -0.15274697542190552,
            -0.1163947656750679]
    assert torch.allclose(y[0, [0, 1, 100, 5000, 15999]], torch.tensor(want), atol=1e-6)


def test_fbank_128_bins_matches_torchaudio_golden_values():
    w = P.resample(_golden_signal(), 44100, 16000)
    spec = P.kaldi_fbank(w[:, :8000], 16000, 128)
    assert spec.shape == (48, 128)
    want = [[-8.72619915008545, -11.706807136535645, -1.6631795167922974, 1.7278752326965332],
            [-8.107640266418457, -9.584480285644531, -0.7905012369155884, 1.455482006072998],
            [-6.546211242675781, -10.39040756225586, -1.6139096021652222, 1.6106741428375244]]
    got = spec[[0, 10, 40]][:, [0, 5, 64, 127]]
    assert torch.allclose(got, torch.tensor(want), atol=1e-4)


class _FakeFrame:
    def __init__(self, value: int, pts: int) -> None:
        self.value, self.pts = value, pts

    def to_ndarray(self, format: str) -> np.ndarray:
        assert format == "rgb24"
        return np.full((48, 64, 3), self.value, dtype=np.uint8)


def test_pyav_decoding_uses_frame_timestamps(monkeypatch, tmp_path):
    """PyAV is optional; a stand-in with PyAV's interface checks timestamp and duration handling."""
    import sys
    import types
    from fractions import Fraction

    class Container:
        def __init__(self) -> None:
            self.streams = types.SimpleNamespace(video=[types.SimpleNamespace(
                time_base=Fraction(1, 1000), duration=6000, average_rate=Fraction(10))])
            self.duration = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def decode(self, stream):
            # a stream starting at 0.5 s: pts in milliseconds, 10 fps, 60 frames
            return (_FakeFrame(4 * i, 500 + 100 * i) for i in range(60))

    fake = types.ModuleType("av")
    fake.open = lambda path: Container()
    fake.error = types.SimpleNamespace(FFmpegError=RuntimeError)
    monkeypatch.setitem(sys.modules, "av", fake)
    video = P.decode_video(tmp_path / "clip.mp4")
    assert video.frames.shape == (60, 48, 64, 3) and video.duration == 6.0
    assert video.times[0] == 0.0 and video.times[1] == pytest.approx(0.1)
    frames, fps = video_frames(60, 10.0)
    assert torch.allclose(P.imagebind_video(tmp_path / "clip.mp4"), P.imagebind_video((frames, fps)))


def test_eight_bit_depth_follows_the_cmcl_reference_loader(tmp_path):
    png8 = tmp_path / "d8.png"
    Image.fromarray(np.full((30, 40), 51, dtype=np.uint8)).save(png8)  # 51/255 * 10 m = 2 m
    grey = P.imagebind_depth(png8)  # auto -> grey/255, as the CMCL reference loader
    assert grey.shape == (1, 224, 224)
    assert torch.allclose(grey, torch.full_like(grey, 51 / 255), atol=1e-6)
    disp = P.imagebind_depth(png8, mode="disparity")  # metres from the 8-bit quantisation
    assert torch.allclose(disp, torch.full_like(disp, 0.075 * 518.857901 / 2.0), rtol=1e-4)
    assert P.read_depth(png8) == pytest.approx(np.full((30, 40), 2.0), rel=1e-6)
    png16 = write_depth_png(tmp_path / "d16.png", metres=2.0)
    assert torch.allclose(P.languagebind_depth(png8), P.languagebind_depth(png16), atol=1e-5)
    with pytest.raises(EncoderError, match="unknown depth mode"):
        P.imagebind_depth(png8, mode="metres")


def test_audio_through_pyav_when_soundfile_is_absent(monkeypatch, tmp_path):
    """A stand-in with PyAV's audio interface: planar float and packed int16 frames."""
    import sys
    import types

    class Frame:
        def __init__(self, arr, name, planar):
            self.arr = arr
            self.format = types.SimpleNamespace(name=name, is_planar=planar)
            self.layout = types.SimpleNamespace(nb_channels=2)

        def to_ndarray(self):
            return self.arr

    t = np.arange(2048)
    left, right = np.sin(t * 0.01).astype(np.float32), np.cos(t * 0.01).astype(np.float32)
    packed = (np.stack([left[1024:], right[1024:]], 1).reshape(1, -1) * 16384).astype(np.int16)
    frames = [Frame(np.stack([left[:1024], right[:1024]]), "fltp", True), Frame(packed, "s16", False)]

    class Container:
        streams = types.SimpleNamespace(audio=[types.SimpleNamespace(rate=22050, codec_context=None)])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def decode(self, stream):
            return iter(frames)

    fake = types.ModuleType("av")
    fake.open = lambda path: Container()
    monkeypatch.setitem(sys.modules, "av", fake)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile -> ImportError
    x, rate = P.read_audio(tmp_path / "clip.mp3")
    assert rate == 22050 and x.shape == (2, 2048)
    assert torch.allclose(x[0, :1024], torch.from_numpy(left[:1024]), atol=1e-6)  # float planar
    assert torch.allclose(x[1, 1024:], torch.from_numpy(right[1024:]) / 2, atol=1e-4)  # int16 packed at half scale
    assert torch.allclose(x[0, 1024:], torch.from_numpy(left[1024:]) / 2, atol=1e-4)


def test_non_wav_audio_without_decoders_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "soundfile", None)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(EncoderError, match=r"clip.mp3.*cmcl\[media\]"):
        P.read_audio(tmp_path / "clip.mp3")
