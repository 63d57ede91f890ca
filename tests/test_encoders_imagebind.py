"""ImageBind and UniBind: tiny real-architecture models, checkpoint loading and checking, extraction."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from cmcl.data.features import FeatureShard
from cmcl.errors import DatasetError, EncoderError, ExtractError
from cmcl.extract.encoders import (
    ENCODERS,
    check_checkpoint,
    load_class_centres,
    load_encoder,
)
from cmcl.extract.encoders.imagebind import ImageBindEncoder
from cmcl.extract.encoders.imagebind_arch import HUGE, TINY, build_imagebind
from cmcl.extract.encoders.unibind import UniBindEncoder
from tests.encoder_fixtures import (
    DOG,
    EOT,
    HELLO,
    SOT,
    extract_records,
    video_frames,
    write_bpe_gz,
    write_depth_png,
    write_image,
    write_wav,
)


class NotATensor:
    """Stands for arbitrary objects a weights-only loader must refuse."""


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.fixture(scope="module")
def tiny_net():
    return build_imagebind(TINY, seed=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "vision": str(write_image(d / "a.png")),
        "tactile": str(write_image(d / "b.png", seed=1)),
        "text": "hello dog",
        "audio": str(write_wav(d / "a.wav", 1.5, 22050)),
        "video": video_frames(30, 10.0),
        "depth": str(write_depth_png(d / "d.png")),
        "thermal": str(write_image(d / "t.png", mode="L")),
        "imu": np.random.default_rng(0).standard_normal((6, 2000)).astype(np.float32),
    }


def test_registry_names_the_three_backbones():
    assert {"imagebind", "unibind"} <= set(ENCODERS)
    with pytest.raises(EncoderError, match="unknown backbone"):
        load_encoder("nope", random_weights="tiny")


def test_full_size_architecture_matches_the_released_key_set():
    net = build_imagebind(HUGE, device="meta")
    sd = net.state_dict()
    assert len(sd) == 1311
    assert sum(p.numel() for p in net.parameters()) == 1_200_781_057
    assert sd["modality_preprocessors.vision.rgbt_stem.proj.1.weight"].shape == (1280, 3, 2, 14, 14)
    assert sd["modality_preprocessors.audio.rgbt_stem.proj.weight"].shape == (768, 1, 16, 16)
    assert sd["modality_preprocessors.audio.pos_embedding_helper.pos_embed"].shape == (1, 229, 768)
    assert sd["modality_preprocessors.depth.depth_stem.proj.weight"].shape == (384, 1, 16, 16)
    assert sd["modality_preprocessors.imu.pos_embed"].shape == (1, 251, 512)
    assert sd["modality_trunks.audio.blocks.0.attn.bias_k"].shape == (1, 1, 768)
    assert "modality_trunks.vision.blocks.0.attn.bias_k" not in sd
    assert sd["modality_heads.imu.3.weight"].shape == (1024, 512)
    assert sd["modality_postprocessors.text.1.log_logit_scale"].shape == ()


def test_every_modality_embeds_to_unit_rows(media):
    enc = load_encoder("imagebind", random_weights="tiny", device="cpu")
    assert enc.dim == 32 and set(media) <= set(enc.modalities)
    for modality, item in media.items():
        x = enc.encode(modality, [item, item])
        assert x.shape == (2, 32) and x.dtype == np.float32, modality
        assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5), modality
        assert np.allclose(x[0], x[1], atol=1e-6), modality
    # different inputs give different embeddings
    a, b = enc.encode("vision", [media["vision"], media["tactile"]])
    assert not np.allclose(a, b)


def test_outputs_follow_upstream_postprocessing(tiny_net):
    torch.manual_seed(0)
    audio = torch.randn(2, 3, 1, 128, 204)
    raw = tiny_net.embed("audio", audio)
    per_clip = torch.stack([tiny_net.embed("audio", audio[:, i]) for i in range(3)], 1)
    assert torch.allclose(raw, per_clip.mean(1), atol=1e-5)  # mean over clips of scaled outputs
    assert torch.allclose(per_clip.norm(dim=-1), torch.full((2, 3), 20.0), atol=1e-4)
    text = torch.tensor([[5, 6, EOT, 0] + [0] * 73])
    assert tiny_net.embed("text", text).norm() == pytest.approx(1 / 0.07, rel=1e-4)
    # text pools at the EOT (argmax) position: tokens after it do not matter
    later = text.clone()
    later[0, 10] = 7
    assert torch.allclose(tiny_net.embed("text", text), tiny_net.embed("text", later), atol=1e-5)


def test_image_is_a_two_frame_video(tiny_net):
    img = torch.randn(1, 3, 224, 224)
    video = img[:, None, :, None].expand(-1, -1, -1, 2, -1, -1)  # (B, clips=1, C, T=2, H, W)
    assert torch.allclose(tiny_net.embed("vision", img), tiny_net.embed("vision", video), atol=1e-6)


def _save(state, path):
    torch.save(state, path)
    return path


@pytest.mark.parametrize("prefix", ["", "module."])
def test_state_dict_round_trip(tmp_path, tiny_net, media, prefix):
    bpe = write_bpe_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    ckpt = _save({prefix + k: v for k, v in tiny_net.state_dict().items()}, tmp_path / "imagebind_huge.pth")
    enc = ImageBindEncoder.load(ckpt, config=TINY, device="cpu")  # finds the BPE file beside it
    assert enc.report.ok and enc.report.matched == len(tiny_net.state_dict())
    assert enc.tokenizer.source == str(bpe)
    assert enc.tokenizer("hello dog")[:4].tolist() == [SOT, HELLO, DOG, EOT]
    ref = tiny_net.embed("vision", enc.preprocessor("vision")(media["vision"])[None])
    got = enc.encode("vision", [media["vision"]])
    assert np.allclose(got, torch.nn.functional.normalize(ref, dim=-1).detach().numpy(), atol=1e-6)
    assert enc.attributes()["checkpoint_sha256"] and enc.checkpoint == str(ckpt)


def test_missing_checkpoint_error_names_file_source_and_option(tmp_path, monkeypatch):
    monkeypatch.delenv("CMCL_IMAGEBIND_CHECKPOINT", raising=False)
    with pytest.raises(EncoderError) as err:
        load_encoder("imagebind")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("imagebind_huge.pth", "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth",
                 "--checkpoint", "CMCL_IMAGEBIND_CHECKPOINT", "--random-weights tiny"):
        assert part in msg
    monkeypatch.setenv("CMCL_IMAGEBIND_CHECKPOINT", str(tmp_path / "gone.pth"))
    with pytest.raises(EncoderError, match="gone.pth does not exist"):
        load_encoder("imagebind")


def test_mismatched_checkpoint_is_reported_key_by_key(tmp_path, tiny_net):
    sd = dict(tiny_net.state_dict())
    del sd["modality_heads.vision.2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["modality_preprocessors.text.pos_embed"] = torch.zeros(1, 76, 32)
    ckpt = _save(sd, tmp_path / "bad.pth")
    write_bpe_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(EncoderError) as err:
        ImageBindEncoder.load(ckpt, config=TINY, device="cpu")
    msg = str(err.value)
    assert "1 missing [modality_heads.vision.2.weight]" in msg
    assert "1 unexpected [extra.weight]" in msg
    assert "modality_preprocessors.text.pos_embed: file (1, 76, 32) vs model (1, 77, 32)" in msg
    report = check_checkpoint("imagebind", ckpt, config=TINY)
    assert not report.ok and report.missing == ["modality_heads.vision.2.weight"]
    # the full-size check rejects a tiny file without loading it into a model
    assert not check_checkpoint("imagebind", ckpt).ok


def test_check_checkpoint_accepts_a_fitting_file(tmp_path, tiny_net):
    ckpt = _save(tiny_net.state_dict(), tmp_path / "ok.pth")
    report = check_checkpoint("imagebind", ckpt, config=TINY)
    assert report.ok and report.matched == len(tiny_net.state_dict())
    assert "keys match" in report.summary()


def test_weights_only_refuses_arbitrary_objects(tmp_path, tiny_net):
    sd = dict(tiny_net.state_dict())
    ckpt = _save({"state_dict": sd, "extra": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(EncoderError, match="--trust-checkpoint-pickle"):
        ImageBindEncoder.load(ckpt, config=TINY, device="cpu")
    write_bpe_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    enc = ImageBindEncoder.load(ckpt, config=TINY, device="cpu", trust_pickle=True)
    assert enc.report.ok


def test_missing_tokenizer_file_is_a_clear_error(tmp_path, tiny_net, monkeypatch):
    monkeypatch.delenv("CMCL_CLIP_BPE", raising=False)
    ckpt = _save(tiny_net.state_dict(), tmp_path / "imagebind_huge.pth")
    with pytest.raises(EncoderError, match="bpe_simple_vocab_16e6.txt.gz"):
        ImageBindEncoder.load(ckpt, config=TINY, device="cpu", tokenizer=tmp_path / "nope.gz")


def test_fp16_outputs_close_to_fp32(media):
    a = load_encoder("imagebind", random_weights="tiny", device="cpu")
    b = load_encoder("imagebind", random_weights="tiny", device="cpu", fp16=True)
    x, y = a.encode("vision", [media["vision"]]), b.encode("vision", [media["vision"]])
    assert y.dtype == np.float32 and np.abs(x - y).max() < 2e-2
    assert b.attributes()["fp16"] and not a.attributes()["fp16"]


# ------------------------------------------------------------------------------ UniBind
def _unibind_file(tmp_path, net):
    sd = {"bind." + k: v for k, v in net.state_dict().items()}
    sd["bind.modality_head_point.0.weight"] = torch.ones(512)
    sd["bind.modality_postprocessor_point.1.log_logit_scale"] = torch.zeros(())
    sd["point_encoder.blocks.0.weight"] = torch.ones(3, 3)
    sd["pc_projection"] = torch.ones(384, 512)
    sd["logit_scale"] = torch.zeros(())
    write_bpe_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    return _save(sd, tmp_path / "pretrained_weights.pt")


def test_unibind_strips_bind_prefix_and_keeps_point_parts_aside(tmp_path, tiny_net, media):
    ckpt = _unibind_file(tmp_path, tiny_net)
    enc = UniBindEncoder.load(ckpt, config=TINY, device="cpu")
    assert enc.name == "unibind" and "event" in enc.modalities
    assert sorted(enc.extra_state) == sorted(["bind.modality_head_point.0.weight", "logit_scale",
                                              "bind.modality_postprocessor_point.1.log_logit_scale",
                                              "point_encoder.blocks.0.weight", "pc_projection"])
    ib = ImageBindEncoder(tiny_net, enc.tokenizer, device="cpu")
    for m in ("vision", "thermal", "text"):
        assert np.allclose(enc.encode(m, [media[m]]), ib.encode(m, [media[m]]), atol=1e-6)
    report = check_checkpoint("unibind", ckpt, config=TINY)
    assert report.ok and len(report.ignored) == 5


def test_unibind_refuses_an_imagebind_file(tmp_path, tiny_net):
    ckpt = _save(tiny_net.state_dict(), tmp_path / "imagebind_huge.pth")
    with pytest.raises(EncoderError, match="no 'bind.' keys"):
        UniBindEncoder.load(ckpt, config=TINY, device="cpu")


def test_unibind_missing_checkpoint_names_the_drive_link(monkeypatch):
    monkeypatch.delenv("CMCL_UNIBIND_CHECKPOINT", raising=False)
    with pytest.raises(EncoderError, match="pretrained_weights.pt.*drive.google.com.*CMCL_UNIBIND_CHECKPOINT"):
        load_encoder("unibind")


def test_class_centres_load_without_unrestricted_unpickler(tmp_path):
    torch.manual_seed(0)
    centres = {"cat": torch.randn(50, 32), "dog": torch.randn(50, 32)}
    path = tmp_path / "image_in_center_embeddings.pkl"
    path.write_bytes(pickle.dumps(centres))
    names, protos, full = load_class_centres(path)
    assert names == ["cat", "dog"] and protos.shape == (2, 32)
    assert np.allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-6)
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(centres["dog"], dim=-1).mean(0), dim=0)
    assert np.allclose(protos[1], expected.numpy(), atol=1e-6)
    assert full["cat"].shape == (50, 32)
    np_path = tmp_path / "np.pkl"
    np_path.write_bytes(pickle.dumps({"a": np.ones((3, 4), np.float32)}))
    assert load_class_centres(np_path)[1].shape == (1, 4)


def test_class_centres_refuse_code_execution(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"cat": Exploit(str(target))}))
    with pytest.raises(EncoderError, match="not allowed"):
        load_class_centres(path)
    assert not target.exists()


# ------------------------------------------------------------------------------ extraction
def test_extraction_writes_a_valid_shard(tmp_path, media):
    enc = load_encoder("imagebind", random_weights="tiny", device="cpu")
    records = [{"id": f"s{i}", "class": ["cat", "dog"][i % 2], "text": f"hello dog {i}", "audio": media["audio"],
                "vision": media["vision"]} for i in range(3)]
    result = extract_records(enc, records, tmp_path, split="test", modalities=("text", "audio", "vision"))
    path = result.path
    assert path == tmp_path / "cache" / "imagebind" / "toy" / "test.h5"
    with FeatureShard(path) as shard:
        shard.check()
        assert shard.meta.dim == 32 and set(shard.meta.modalities) == {"text", "audio", "vision"}
        assert shard.meta.extra["random_weights"] == "tiny"
        assert "audio_mel_bins" in shard.meta.extra["preprocessing"]
        assert list(shard.ids) == [f"s{i}" for i in range(3)]
        assert list(shard.text) == [f"hello dog {i}" for i in range(3)]
        names, protos = shard.classes()
        assert list(names) == ["cat", "dog"] and protos["text"].shape == (2, 32)
        assert list(shard.labels) == [0, 1, 0]
        assert np.allclose(shard.load("text")[0], enc.encode("text", ["hello dog 0"])[0], atol=1e-6)
        for m in ("text", "audio", "vision"):       # every row is its own record's embedding
            rows = shard.load(m)
            for i, rec in enumerate(records):
                np.testing.assert_allclose(rows[i], enc.encode(m, [rec[m]])[0], atol=2e-5, err_msg=f"{m} row {i}")
    again = extract_records(enc, records, tmp_path, split="test", modalities=("text", "audio", "vision"))
    assert again.status == "exists" and again.path == path     # an identical shard is not written twice


def test_extraction_rejects_unknown_modality_and_missing_items(tmp_path, media):
    enc = load_encoder("imagebind", random_weights="tiny", device="cpu")
    with pytest.raises(ExtractError, match=r"cannot embed \['point'\]"):
        extract_records(enc, [{"id": "x", "point": media["audio"]}], tmp_path, split="a", modalities=("point",))
    with pytest.raises(DatasetError, match="empty 'audio'"):
        extract_records(enc, [{"id": "x", "text": "t", "audio": media["audio"]}, {"id": "y", "text": "u"}],
                        tmp_path, split="b", modalities=("text", "audio"))
    assert not (tmp_path / "cache" / "imagebind" / "toy" / "b.h5").exists()


@pytest.mark.parametrize("name", ["imagebind", "unibind", "languagebind"])
def test_preprocessors_are_picklable_for_worker_processes(name, media):
    enc = load_encoder(name, random_weights="tiny", device="cpu")
    for m in ("vision", "text", "audio", "video", "depth", "thermal"):
        prep = pickle.loads(pickle.dumps(enc.preprocessor(m)))
        assert torch.equal(prep(media[m]), enc.preprocessor(m)(media[m])), m


def test_checkpoint_that_is_a_folder_is_reported(tmp_path):
    with pytest.raises(EncoderError, match="is not a file"):
        load_encoder("imagebind", checkpoint=tmp_path)


def test_diff_backbones_reports_equal_and_changed_tensors(tmp_path, tiny_net):
    from cmcl.extract.encoders.unibind import diff_backbones

    ub = _unibind_file(tmp_path, tiny_net)
    ib = _save(tiny_net.state_dict(), tmp_path / "imagebind_huge.pth")
    same = diff_backbones(ub, ib)
    assert same["identical"] and same["equal"] == len(tiny_net.state_dict()) and same["max_abs_diff"] == 0.0
    changed = dict(tiny_net.state_dict())
    changed["modality_heads.vision.2.weight"] = changed["modality_heads.vision.2.weight"] + 0.5
    del changed["modality_heads.imu.3.weight"]
    ib2 = _save(changed, tmp_path / "other.pth")
    diff = diff_backbones(ub, ib2)
    assert not diff["identical"] and diff["differing"][0][0] == "modality_heads.vision.2.weight"
    assert diff["max_abs_diff"] == pytest.approx(0.5)
    assert diff["only_unibind"] == ["modality_heads.imu.3.weight"]
