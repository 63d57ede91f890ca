"""LanguageBind: tiny real-architecture towers, HF folder loading, LoRA merge, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cmcl.data.features import FeatureShard
from cmcl.errors import EncoderError
from cmcl.extract.encoders import check_checkpoint, load_encoder
from cmcl.extract.encoders import preprocess as P
from cmcl.extract.encoders.languagebind_arch import (
    LanguageBindConfig,
    build_languagebind,
    large_config,
    merge_lora,
    tiny_config,
)
from tests.encoder_fixtures import (
    DOG,
    EOT,
    HELLO,
    SOT,
    extract_records,
    video_frames,
    write_hf_tokenizer,
    write_image,
    write_wav,
)

NAMES = {"image": "LanguageBind_Image", "video": "LanguageBind_Video_FT", "audio": "LanguageBind_Audio_FT",
         "depth": "LanguageBind_Depth", "thermal": "LanguageBind_Thermal"}


def write_folder(folder, tower, *, fmt="safetensors", seed=0, lora=False, extra=None, cfg=None):
    """A LanguageBind HF folder with a tiny random tower; returns the network it holds."""
    cfg = cfg or tiny_config(tower)
    net = build_languagebind(cfg, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    if lora:
        d["vision_config"]["lora_r"], d["vision_config"]["lora_alpha"] = 2, 4
        wrapped = {}
        for k, v in state.items():
            if k.startswith("vision_model.encoder.") and k.endswith(("q_proj.weight", "v_proj.weight")):
                inner = k.replace("vision_model.encoder.", "vision_model.encoder.base_model.model.")
                base = inner[: -len(".weight")]
                wrapped[base + ".base_layer.weight"] = v
                wrapped[base + ".lora_A.default.weight"] = torch.randn(2, v.shape[1]) * 0.1
                wrapped[base + ".lora_B.default.weight"] = torch.randn(v.shape[0], 2) * 0.1
            elif k.startswith("vision_model.encoder."):
                wrapped[k.replace("vision_model.encoder.", "vision_model.encoder.base_model.model.")
                        .replace(".weight", ".base_layer.weight") if "_proj." in k else
                        k.replace("vision_model.encoder.", "vision_model.encoder.base_model.model.")] = v
            else:
                wrapped[k] = v
        state = wrapped
    state.update(extra or {})
    (folder / "config.json").write_text(json.dumps(d))
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    write_hf_tokenizer(folder)
    return net, state


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("lb")
    nets = {}
    for i, (tower, name) in enumerate(NAMES.items()):
        extra = {"vision_model.embeddings.position_ids": torch.arange(593)[None]} if tower == "audio" else None
        nets[tower], _ = write_folder(root / name, tower, seed=i, fmt="bin" if tower == "depth" else "safetensors",
                                      extra=extra)
    return root, nets


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("lbmedia")
    return {"vision": str(write_image(d / "a.png")), "thermal": str(write_image(d / "t.png", seed=3)),
            "audio": str(write_wav(d / "a.wav", 2.0, 16000)), "video": video_frames(24, 8.0),
            "depth": np.full((30, 40), 2.0, np.float32), "text": "hello dog"}


def test_large_configs_match_the_released_parameter_counts():
    counts = {k: sum(p.numel() for p in build_languagebind(large_config(k), device="meta").parameters())
              for k in ("image", "video", "audio")}
    assert round(counts["image"] / 1e6, 1) == 427.6
    assert round(counts["video"] / 1e6, 1) == 528.6
    assert round(counts["audio"] / 1e6, 1) == 428.0
    sd = build_languagebind(large_config("audio"), device="meta").state_dict()
    assert sd["vision_model.embeddings.position_embedding.weight"].shape == (593, 1024)  # 8 x 74 + 1
    assert len(build_languagebind(large_config("image"), device="meta").state_dict()) == 590


def test_folder_round_trip_matches_the_saved_towers(hub, media):
    root, nets = hub
    enc = load_encoder("languagebind", checkpoint=root, device="cpu", modalities=["text", "audio"])
    assert enc.text_source == "audio" and enc.dim == 16
    assert set(enc.modalities) == {"vision", "tactile", "video", "audio", "depth", "thermal", "text"}
    for modality, tower in (("vision", "image"), ("audio", "audio"), ("video", "video"), ("depth", "depth"),
                            ("thermal", "thermal")):
        x = enc.preprocessor(modality)(media[modality])[None]
        want = torch.nn.functional.normalize(nets[tower].embed_vision(x), dim=-1).numpy()
        got = enc.encode(modality, [media[modality]])
        assert got.shape == (1, 16) and np.allclose(got, want, atol=1e-5), modality
        assert enc.reports[tower].ok
    ids = enc.tokenizer("hello dog")
    assert ids[:4].tolist() == [SOT, HELLO, DOG, EOT] and ids[4:].eq(EOT).all()
    want = torch.nn.functional.normalize(nets["audio"].embed_text(ids[None]), dim=-1).numpy()
    assert np.allclose(enc.encode("text", ["hello dog"]), want, atol=1e-5)
    assert enc.attributes()["text_checkpoint"] == str(root / NAMES["audio"])
    assert enc.reports["audio"].ignored == ["vision_model.embeddings.position_ids"]


def test_text_checkpoint_is_chosen_explicitly(hub):
    root, nets = hub
    a = load_encoder("languagebind", checkpoint=root, device="cpu", text_checkpoint="image")
    b = load_encoder("languagebind", checkpoint=root, device="cpu", text_checkpoint=root / NAMES["thermal"])
    assert a.attributes()["text_checkpoint"].endswith("LanguageBind_Image")
    assert b.text_source == "thermal"
    assert not np.allclose(a.encode("text", ["dog"]), b.encode("text", ["dog"]))
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder("languagebind", checkpoint=root, text_checkpoint=root / "nowhere")


def test_single_folder_checkpoint(hub, media):
    root, nets = hub
    enc = load_encoder("languagebind", checkpoint=root / NAMES["image"], device="cpu")
    assert set(enc.modalities) == {"vision", "tactile", "text"}
    with pytest.raises(EncoderError, match="cannot embed 'audio'"):
        enc.preprocessor("audio")
    with pytest.raises(EncoderError, match="LanguageBind_Audio_FT"):
        load_encoder("languagebind", checkpoint=root / NAMES["image"], modalities=["audio"])


def test_video_tower_keeps_samples_apart_and_uses_frame_order(hub):
    _, nets = hub
    net = nets["video"]
    torch.manual_seed(0)
    a, b = torch.randn(1, 3, 8, 224, 224), torch.randn(1, 3, 8, 224, 224)
    both = net.embed_vision(torch.cat([a, b]))
    assert torch.allclose(both[0], net.embed_vision(a)[0], atol=1e-5)
    assert torch.allclose(both[1], net.embed_vision(b)[0], atol=1e-5)
    assert not torch.allclose(net.embed_vision(a), net.embed_vision(a.flip(2)), atol=1e-4)


def test_video_tower_without_temporal_parts_is_a_frame_mean():
    video = build_languagebind(tiny_config("video"), seed=1)
    image = build_languagebind(tiny_config("image"), seed=2)
    sd = dict(video.state_dict())
    for k in sd:
        if "temporal_embedding" in k or "temporal_attn.out_proj" in k:
            sd[k] = torch.zeros_like(sd[k])
    video.load_state_dict(sd)
    image.load_state_dict({k: v for k, v in sd.items() if "temporal" not in k})
    x = torch.randn(1, 3, 8, 224, 224)
    frames = image.vision_model(x[0].transpose(0, 1))
    assert torch.allclose(video.vision_model(x)[0], frames.mean(0), atol=1e-5)


def test_lora_checkpoint_is_merged(tmp_path, media):
    net, state = write_folder(tmp_path / "LanguageBind_Depth", "depth", seed=5, lora=True)
    merged, n = merge_lora(state, alpha=4)
    assert n == 2  # q_proj and v_proj of the single layer
    key = "vision_model.encoder.layers.0.self_attn.q_proj"
    a = state[key.replace("encoder.", "encoder.base_model.model.") + ".lora_A.default.weight"]
    b = state[key.replace("encoder.", "encoder.base_model.model.") + ".lora_B.default.weight"]
    assert torch.allclose(merged[key + ".weight"], net.state_dict()[key + ".weight"] + 2.0 * b @ a)
    enc = load_encoder("languagebind", checkpoint=tmp_path, device="cpu")
    net.load_state_dict(merged)
    x = enc.preprocessor("depth")(media["depth"])[None]
    want = torch.nn.functional.normalize(net.embed_vision(x), dim=-1).numpy()
    assert np.allclose(enc.encode("depth", [media["depth"]]), want, atol=1e-5)
    assert check_checkpoint("languagebind", tmp_path).ok


def test_missing_checkpoint_and_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CMCL_LANGUAGEBIND_CHECKPOINT", raising=False)
    with pytest.raises(EncoderError) as err:
        load_encoder("languagebind")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("LanguageBind_Image", "https://huggingface.co/LanguageBind/", "--checkpoint",
                 "CMCL_LANGUAGEBIND_CHECKPOINT"):
        assert part in msg
    with pytest.raises(EncoderError, match="holds no LanguageBind checkpoint"):
        load_encoder("languagebind", checkpoint=tmp_path)
    write_folder(tmp_path / "LanguageBind_Image", "image")
    (tmp_path / "LanguageBind_Image" / "merges.txt").unlink()
    with pytest.raises(EncoderError, match="vocab.json and merges.txt are missing"):
        load_encoder("languagebind", checkpoint=tmp_path)
    (tmp_path / "LanguageBind_Image" / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match="no weights file"):
        check_checkpoint("languagebind", tmp_path)


def test_mismatched_folder_is_reported(tmp_path):
    net, state = write_folder(tmp_path / "LanguageBind_Thermal", "thermal")
    state = dict(state)
    state.pop("text_projection.weight")
    state["visual_projection.weight"] = torch.zeros(16, 31)
    save_file(state, str(tmp_path / "LanguageBind_Thermal" / "model.safetensors"))
    report = check_checkpoint("languagebind", tmp_path)
    assert report.missing == ["LanguageBind_Thermal:text_projection.weight"]
    assert report.mismatched[0][0] == "LanguageBind_Thermal:visual_projection.weight"
    enc = load_encoder("languagebind", checkpoint=tmp_path, device="cpu", text_checkpoint="thermal")
    with pytest.raises(EncoderError, match="1 missing"):
        enc.encode("thermal", [str(write_image(tmp_path / "x.png"))])


def test_audio_preprocessing_feeds_the_non_square_tower(hub):
    _, nets = hub
    x = P.languagebind_audio((np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1, 16000))
    assert x.shape == (3, 112, 1036)
    assert nets["audio"].embed_vision(x[None]).shape == (1, 16)


def test_random_tiny_extraction_records_provenance(tmp_path, media):
    enc = load_encoder("languagebind", random_weights="tiny", device="cpu", modalities=["text", "video"])
    from tests.test_media_decoding import write_mp4

    clip = str(write_mp4(tmp_path / "clip.mp4", seconds=1))
    records = [{"id": f"v{i}", "text": f"dog {i}", "video": clip} for i in range(3)]
    path = extract_records(enc, records, tmp_path, split="train", modalities=("text", "video")).path
    with FeatureShard(path) as shard:
        shard.check()
        assert shard.meta.backbone == "languagebind" and shard.meta.dim == 16
        assert shard.meta.extra["random_weights"] == "tiny"
        assert shard.meta.extra["text_checkpoint"] == "tiny:video"
        assert json.loads(shard.meta.extra["preprocessing"])["video"]["num_frames"] == 8


def test_sharded_safetensors_folder(tmp_path, media):
    folder = tmp_path / "LanguageBind_Image"
    net, state = write_folder(folder, "image", seed=7)
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in parts.items():
        save_file({k: state[k] for k in ks}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    report = check_checkpoint("languagebind", folder)
    assert report.ok and report.matched == len(state)
    enc = load_encoder("languagebind", checkpoint=folder, device="cpu")
    x = enc.preprocessor("vision")(media["vision"])[None]
    want = torch.nn.functional.normalize(net.embed_vision(x), dim=-1).numpy()
    assert np.allclose(enc.encode("vision", [media["vision"]]), want, atol=1e-5)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EncoderError, match="listed in model.safetensors.index.json but missing"):
        check_checkpoint("languagebind", folder)


def test_random_weight_sizes():
    assert load_encoder("languagebind", random_weights="large", device="cpu").dim == 768
    with pytest.raises(EncoderError, match="unknown --random-weights 'huge'"):
        load_encoder("languagebind", random_weights="huge")


# ------------------------------------------------------------------------------ V1.5 video (vl_new)
def test_v15_video_checkpoint_loads_from_its_config(tmp_path, media):
    folder = tmp_path / "LanguageBind_Video_V1.5_FT"
    net, state = write_folder(folder, "video", seed=11, cfg=tiny_config("video", clip_type="vl_new"))
    assert state["vision_model.embeddings.class_embedding"].shape == (8, 32)  # one class token per frame
    assert state["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 1, 14, 14)  # Conv3d
    report = check_checkpoint("languagebind", tmp_path)
    assert report.ok and report.matched == len(state)
    enc = load_encoder("languagebind", checkpoint=tmp_path, device="cpu", modalities=["video"])
    x = enc.preprocessor("video")(media["video"])[None]
    want = torch.nn.functional.normalize(net.embed_vision(x), dim=-1).numpy()
    assert np.allclose(enc.encode("video", [media["video"]]), want, atol=1e-5)
    assert enc.reports["video"].ok
    # the same weights under a config without clip_type: the layout is read from config.json, so
    # the 3-D patch embedding and the per-frame class tokens no longer fit
    d = json.loads((folder / "config.json").read_text())
    del d["vision_config"]["clip_type"]
    (folder / "config.json").write_text(json.dumps(d))
    report = check_checkpoint("languagebind", tmp_path)
    assert sorted(k for k, _, _ in report.mismatched) == [
        "LanguageBind_Video_V1.5_FT:vision_model.embeddings.class_embedding",
        "LanguageBind_Video_V1.5_FT:vision_model.embeddings.patch_embedding.weight"]


def test_v15_video_gives_each_frame_its_class_token():
    """Defining property of the V1.5 layout: frame t's tokens start with class token t, and the
    Conv3d with a one-frame tube is the per-frame Conv2d. With all class rows equal it is the
    original video tower; changing any single row (not only frame 0's) changes the output."""
    v1 = build_languagebind(tiny_config("video"), seed=3)
    v15 = build_languagebind(tiny_config("video", clip_type="vl_new"), seed=4)
    sd = dict(v1.state_dict())
    cls2d, conv2d = sd["vision_model.embeddings.class_embedding"], sd["vision_model.embeddings.patch_embedding.weight"]
    sd["vision_model.embeddings.class_embedding"] = cls2d.repeat(8, 1)
    sd["vision_model.embeddings.patch_embedding.weight"] = conv2d[:, :, None]
    v15.load_state_dict(sd)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 224, 224)
    base = v15.embed_vision(x)
    assert torch.allclose(base, v1.embed_vision(x), atol=1e-5)
    for frame in (0, 5):
        sd2 = dict(sd)
        cls = sd["vision_model.embeddings.class_embedding"].clone()
        cls[frame] += torch.randn(32)  # not a constant shift, which pre_layrnorm would remove
        sd2["vision_model.embeddings.class_embedding"] = cls
        v15.load_state_dict(sd2)
        assert not torch.allclose(v15.embed_vision(x), base, atol=1e-3), frame
    with pytest.raises(ValueError, match=r"takes \(B, C, 8, H, W\)"):
        v15.embed_vision(torch.randn(1, 3, 4, 224, 224))
    with pytest.raises(ValueError, match="takes"):
        v15.embed_vision(torch.randn(1, 3, 224, 224))


def test_v15_config_fields_and_refused_layouts(tmp_path):
    d = tiny_config("video", clip_type="vl_new").to_dict()
    assert LanguageBindConfig.from_dict(d).vision.per_frame_tokens
    assert round(sum(p.numel() for p in build_languagebind(large_config("video", "vl_new"), device="meta")
                     .parameters()) / 1e6, 1) == 528.6  # 7 more class tokens than V1: +7168 parameters
    other = dict(d, model_type="LanguageBindImage")  # only upstream's video model reads clip_type
    assert not LanguageBindConfig.from_dict(other).vision.per_frame_tokens
    d["vision_config"]["tube_size"] = 2
    with pytest.raises(EncoderError, match="only tube_size 1 is supported"):
        LanguageBindConfig.from_dict(d)
    folder = tmp_path / "LanguageBind_Video_V1.5_FT"
    write_folder(folder, "video", cfg=tiny_config("video", clip_type="vl_new"))
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(EncoderError, match=r"LanguageBind_Video_V1.5_FT/config.json: vision_config.tube_size 2") as err:
        check_checkpoint("languagebind", tmp_path)
    assert "\n" not in str(err.value)
    d["vision_config"].update(tube_size=1, add_time_attn=False)
    with pytest.raises(EncoderError, match="without add_time_attn"):
        LanguageBindConfig.from_dict(d)
