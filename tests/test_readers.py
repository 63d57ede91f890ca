"""Each reader returns the records the reference logic defines, on synthetic layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests import dataset_fixtures as fx
from cmcl.data.catalog import DATASETS
from cmcl.data.readers import READERS, get_reader, parse_reader_options
from cmcl.data.readers.base import NO_LABEL, split_camel_case
from cmcl.data.readers.nyudv2 import convert_official, depth_to_png8
from cmcl.data.readers.vggsound_s import MANIFEST_HEADER, freeze_manifest, load_manifest
from cmcl.errors import DatasetError


def test_registry_matches_catalog():
    assert list(READERS) == list(DATASETS)
    for name, cls in READERS.items():
        assert cls.name == name
        assert cls.modalities == DATASETS[name].modalities
        assert cls.has_classes == (DATASETS[name].n_classes > 0)


def test_unknown_dataset_and_option(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        get_reader("imagenet", tmp_path)
    fx.make_llvip(tmp_path)
    with pytest.raises(DatasetError, match=r"unknown reader option\(s\) \['cap'\]"):
        get_reader("llvip", tmp_path, cap=3)


def test_parse_reader_options():
    assert parse_reader_options("vggsound_s", ["manifest=a=b.csv", "cap-train=5", "select=reference"]) == \
        {"manifest": "a=b.csv", "cap_train": 5, "select": "reference"}
    assert parse_reader_options("ucf101", ["split_set=2"]) == {"split_set": 2}
    both = ["vggsound_s.manifest=m.csv", "ucf101.split_set=3"]
    assert parse_reader_options("ucf101", both) == {"split_set": 3}
    assert parse_reader_options("vggsound_s", both) == {"manifest": "m.csv"}
    assert parse_reader_options("llvip", both) == {}
    with pytest.raises(DatasetError, match="split_set expects an integer, got .two."):
        parse_reader_options("ucf101", ["split_set=two"])
    with pytest.raises(DatasetError, match="KEY in none"):
        parse_reader_options("llvip", ["x=1"])
    with pytest.raises(DatasetError, match="bad reader option 'manifest'"):
        parse_reader_options("vggsound_s", ["manifest"])


@pytest.mark.parametrize("name", list(READERS))
def test_wrong_layout_names_expected_path(tmp_path, name):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        get_reader(name, tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)


@pytest.mark.parametrize("text, expected", [("ApplyEyeMakeup", "apply eye makeup"), ("YoYo", "yo yo"),
                                            ("TaiChi", "tai chi"), ("Basketball", "basketball")])
def test_camel_case(text, expected):
    assert split_camel_case(text) == expected


# ------------------------------------------------------------------------------------ UCF101
@pytest.mark.parametrize("official", [False, True])
def test_ucf101(tmp_path, official):
    want = fx.make_ucf101(tmp_path, official=official)
    before = fx.tree_digest(tmp_path)
    r = get_reader("ucf101", tmp_path)
    assert r.layout == ("official" if official else "reference")
    train, test = r.records("train"), r.records("test")
    assert [x.id for x in train] == want["train"]
    assert [x.id for x in test] == want["test"]  # test + val merged
    assert len(train) == 6 and len(test) == 6
    assert r.class_names() == ["ApplyEyeMakeup", "TaiChi", "YoYo"]
    assert r.class_texts() == ["apply eye makeup", "tai chi", "yo yo"]
    rec = next(x for x in test if x.id == "YoYo_v_YoYo_g09_c01")
    assert rec.name == "YoYo" and rec.text == "yo yo" and rec.label == 2
    assert Path(rec.data["video"]).is_file() and rec.data["video"].endswith("v_YoYo_g09_c01.avi")
    assert set(rec.data) == {"text", "video"}
    assert fx.tree_digest(tmp_path) == before


def test_ucf101_reference_and_official_agree(tmp_path):
    fx.make_ucf101(tmp_path / "a")
    fx.make_ucf101(tmp_path / "b", official=True)
    a, b = get_reader("ucf101", tmp_path / "a"), get_reader("ucf101", tmp_path / "b")
    for s in ("train", "test"):
        assert [(x.id, x.name, x.text, x.label) for x in a.records(s)] == \
               [(x.id, x.name, x.text, x.label) for x in b.records(s)]


# ------------------------------------------------------------------------------------ ESC-50
@pytest.fixture(scope="module")
def esc50_both(tmp_path_factory):
    root = tmp_path_factory.mktemp("esc")
    want = fx.make_esc50(root / "ref")
    fx.make_esc50(root / "off", official=True)
    return root, want


def test_esc50_parquet_rule(esc50_both, tmp_path):
    root, want = esc50_both
    before = fx.tree_digest(root / "ref")
    r = get_reader("esc50", root / "ref", cache_dir=tmp_path / "cache")
    assert r.layout == "reference"
    train, test = r.records("train"), r.records("test")
    assert len(train) == 1600 and len(test) == 400
    assert [x.id for x in train] == want["train"] and [x.id for x in test] == want["test"]
    assert {x.id.split("-")[0] for x in test} == {"5"}  # the 600-row cutoff is fold 5 held out
    counts = np.bincount([x.label for x in test], minlength=50)
    assert (counts == 8).all()
    rec = next(x for x in train if x.name == "chirping_birds")
    assert rec.text == "chirping_birds"  # underscores kept, as the reference
    assert r.class_names() == sorted(fx.ESC_NAMES) and r.class_texts() == sorted(fx.ESC_NAMES)
    # prepare() writes the WAVs below cache_dir only, byte-identical to the parquet's.
    r.prepare(test[:3])
    for x in test[:3]:
        assert Path(x.data["audio"]).read_bytes() == fx.wav_bytes(x.id)
        assert str(tmp_path / "cache") in x.data["audio"]
    assert not Path(test[3].data["audio"]).exists()
    assert fx.tree_digest(root / "ref") == before


def test_esc50_official_layout_equals_parquet_rule(esc50_both, tmp_path):
    root, _ = esc50_both
    a = get_reader("esc50", root / "ref", cache_dir=tmp_path)
    b = get_reader("esc50", root / "off")
    assert b.layout == "official"
    for s in ("train", "test"):
        assert [(x.id, x.name, x.text, x.label) for x in a.records(s)] == \
               [(x.id, x.name, x.text, x.label) for x in b.records(s)]
    assert all(Path(x.data["audio"]).is_file() for x in b.records("test"))


def test_esc50_needs_both_parquet_files(tmp_path):
    (tmp_path / "esc50" / "data").mkdir(parents=True)
    (tmp_path / "esc50" / "data" / "train-00000-of-00002-aaaa.parquet").write_bytes(b"x")
    with pytest.raises(DatasetError, match="train-00001-of-00002"):
        get_reader("esc50", tmp_path)


# ------------------------------------------------------------------------------------ NYUDv2
def test_nyudv2(tmp_path):
    want = fx.make_nyudv2(tmp_path)
    r = get_reader("nyudv2", tmp_path)
    for s in ("train", "test"):
        recs = r.records(s)
        assert [(x.id, x.text) for x in recs] == want[s]
        assert all(x.name == NO_LABEL and x.label == -1 for x in recs)
        assert all(x.data["vision"].endswith("rgb.png") and x.data["depth"].endswith("depth.png") for x in recs)
    assert {x.text for x in r.records("train")} == {"living", "office", "basement"}
    assert r.class_names() == []


def test_nyudv2_official_tars_convert(tmp_path):
    from PIL import Image

    fx.make_nyudv2_tars(tmp_path / "nyu-d-2" / "data")
    with pytest.raises(DatasetError, match="convert_official"):
        get_reader("nyudv2", tmp_path)
    n = convert_official(tmp_path / "nyu-d-2" / "data", tmp_path / "nyu-d-2" / "raw_data")
    assert n == 3
    r = get_reader("nyudv2", tmp_path)
    assert [x.id for x in r.records("train")] == ["living_room_0001_00001", "living_room_0001_00002"]
    assert [x.id for x in r.records("test")] == ["official_00001"]
    depth = np.asarray(Image.open(r.records("test")[0].data["depth"]))
    assert depth.dtype == np.uint8 and depth[0, 0] == 0 and depth[-1, -1] == 255
    assert depth_to_png8(np.array([5.0]))[0] == 128
    rgb = np.asarray(Image.open(r.records("train")[1].data["vision"]))
    assert rgb.shape == (4, 5, 3) and (rgb == 20).all()
    assert convert_official(tmp_path / "nyu-d-2" / "data", tmp_path / "nyu-d-2" / "raw_data") == 0


# ------------------------------------------------------------------------------------ Clotho
def test_clotho(tmp_path):
    fx.make_clotho(tmp_path)
    before = fx.tree_digest(tmp_path)
    r = get_reader("clotho", tmp_path)
    train = {x.id: x for x in r.records("train")}
    assert sorted(train) == ["a", "birds, morning.v2", "rain on roof"]  # full stem, not first-dot cut
    assert train["rain on roof"].text == 'Rain falls, steadily "and" softly, on a roof.'  # caption_1 only
    assert train["birds, morning.v2"].data["audio"].endswith("development/birds, morning.v2.wav")
    assert all(x.name == NO_LABEL and x.label == -1 for x in train.values())
    test = r.records("test")
    assert [x.id for x in test] == ["missing clip", "street"]
    assert r.missing_files(test) == [("missing clip", "audio", str(tmp_path / "clotho/evaluation/missing clip.wav"))]
    assert fx.tree_digest(tmp_path) == before


def test_clotho_colliding_ids_fail(tmp_path):
    fx.make_clotho(tmp_path)
    csv = tmp_path / "clotho" / "clotho_captions_development.csv"
    csv.write_text(csv.read_text() + "a.WAV,dup,c,c,c,c\n".replace(".WAV", ".flac"))
    with pytest.raises(DatasetError, match="'a' occurs twice"):
        get_reader("clotho", tmp_path).records("train")


# ------------------------------------------------------------------------------------ VGGSound-S
def test_vggsound_available_strict_cap(tmp_path):
    fx.make_vggsound(tmp_path)
    r = get_reader("vggsound_s", tmp_path, select="available", cap_train=3, cap_test=2, cache_dir=tmp_path / "c")
    train = r.records("train")
    # first 3 train rows (CSV order) with an mp4: --56QUhyDQM has none
    assert [x.id for x in train] == ["--0PQM4-hqg_000030", "--5OkAjCI7g_000040", "--8puiAGLhs_000030"]
    assert [x.id for x in r.records("test")] == ["---g-f_I2yQ_000001", "--96EN9NUQM_000242"]
    rec = train[1]
    assert rec.text == rec.name == "bird chirping, tweeting"
    assert rec.data["video"].endswith("VGGSound_final/video/--5OkAjCI7g_000040.mp4")
    assert rec.data["audio"].endswith("VGGSound_final/audio/--5OkAjCI7g_000040.mp3")
    # no mp3 in the tree: the audio track is extracted into the cache, never into the dataset
    assert train[2].data["audio"] == str(tmp_path / "c" / "vggsound_s" / "audio" / "--8puiAGLhs_000030.wav")
    assert [(s.id, s.reason) for s in r.skipped("train")] == [("--56QUhyDQM_000185", "video missing")]
    assert r.class_names() == sorted({x.name for s in ("train", "test") for x in r.records(s)})


def test_vggsound_reference_rule_off_by_one(tmp_path):
    fx.make_vggsound(tmp_path)
    r = get_reader("vggsound_s", tmp_path, select="reference", cap_train=3, cap_test=1)
    # counts 4 (cap + 1) clips with mp4s, then drops the one whose mp3 is missing after counting
    assert [x.id for x in r.records("train")] == ["--0PQM4-hqg_000030", "--5OkAjCI7g_000040", "--9O4XZOge4_000020"]
    assert ("--8puiAGLhs_000030", "audio (mp3) missing") in [(s.id, s.reason) for s in r.skipped("train")]
    assert len(r.records("test")) == 2


def test_vggsound_manifest_roundtrip(tmp_path):
    fx.make_vggsound(tmp_path)
    path = freeze_manifest(tmp_path, tmp_path / "m" / "subset.csv", cap_train=4, cap_test=3)
    text = path.read_text()
    assert text.startswith(MANIFEST_HEADER + "\n# select=available cap_train=4 cap_test=3")
    m = load_manifest(path)
    assert len(m["train"]) == 4 and len(m["test"]) == 3
    # After link rot (a clip of the manifest disappears) the subset does not change; the engine
    # reports the missing clip instead.
    gone = Path(get_reader("vggsound_s", tmp_path, manifest=path).records("train")[0].data["video"])
    gone.unlink()
    r = get_reader("vggsound_s", tmp_path, manifest=path)
    assert [x.id for x in r.records("train")] == m["train"]
    assert r.missing_files(r.records("train"))[0][2] == str(gone)
    avail = get_reader("vggsound_s", tmp_path, select="available", cap_train=4)
    assert [x.id for x in avail.records("train")] != m["train"]


def test_vggsound_manifest_errors(tmp_path):
    fx.make_vggsound(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("split,id\ntrain,x\n")
    with pytest.raises(DatasetError, match="does not start with"):
        get_reader("vggsound_s", tmp_path, manifest=bad).records("train")
    bad.write_text(MANIFEST_HEADER + "\nsplit,id\ntrain,nope_000001\n")
    with pytest.raises(DatasetError, match="not train rows"):
        get_reader("vggsound_s", tmp_path, manifest=bad).records("train")
    with pytest.raises(DatasetError, match="needs a manifest"):
        get_reader("vggsound_s", tmp_path, select="manifest")


def test_vggsound_prepare_extracts_audio_into_cache(tmp_path):
    fx.make_vggsound(tmp_path)
    fake = tmp_path / "fake-ffmpeg"  # copies the input to the output, like an audio extraction would
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys\n"
                    "shutil.copy(sys.argv[sys.argv.index('-i') + 1], sys.argv[-1])\n")
    fake.chmod(0o755)
    r = get_reader("vggsound_s", tmp_path, select="available", cap_train=3, cache_dir=tmp_path / "c", ffmpeg=str(fake))
    before = fx.tree_digest(tmp_path / "vggsound")
    recs = r.records("train")
    r.prepare(recs)
    assert Path(recs[2].data["audio"]).read_bytes() == Path(recs[2].data["video"]).read_bytes()
    assert fx.tree_digest(tmp_path / "vggsound") == before
    r2 = get_reader("vggsound_s", tmp_path, select="available", cap_train=3, cache_dir=tmp_path / "d",
                    ffmpeg="no-such-ffmpeg-binary")
    with pytest.raises(DatasetError, match="ffmpeg"):
        r2.prepare(r2.records("train"))


# ------------------------------------------------------------------------------------ TVL
def test_tvl(tmp_path):
    fx.make_tvl(tmp_path)
    r = get_reader("tvl", tmp_path)
    train = {x.id: x for x in r.records("train")}
    assert sorted(train) == sorted(["vision_ssvtp_0", "vision_ssvtp_2", "vision_hct_data1_0", "vision_hct_data1_1",
                                    "vision_hct_data2_0", "vision_hct_data2_1", "vision_hct_data3_0",
                                    "vision_hct_data3_1"])
    assert train["vision_ssvtp_0"].text == "smooth, hard"  # "\r\n" and "." removed
    assert train["vision_ssvtp_2"].text == "Rough, Soft, glossy"  # no lower-casing
    assert train["vision_hct_data2_1"].text == train["vision_hct_data2_1"].name == "hard, cold21"
    assert train["vision_hct_data1_0"].data["tactile"].endswith("hct/data1/0-1702507211.615537/tactile/0.jpg")
    assert [(s.id, s.reason.split(" in ")[0]) for s in r.skipped("train")] == [("vision_ssvtp_1", "caption is missing")]
    test = {x.id: x for x in r.records("test")}
    assert test["vision_ssvtp_0"].data["tactile"].endswith("ssvtp/images_tac/image_3_tac.jpg")  # rgb -> tac
    assert test["vision_ssvtp_0"].text == "bumpy textured"
    assert "vision_hct_data3_0" in test and "vision_ssvtp_0" in train  # ids repeat across splits
    assert all(x.label == -1 and set(x.data) == {"vision", "text", "tactile"} for x in test.values())
    assert not r.missing_files(list(train.values()) + list(test.values()))


def test_tvl_missing_subset(tmp_path):
    fx.make_tvl(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "tvl" / "tvl_dataset" / "hct" / "data3")
    with pytest.raises(DatasetError, match="hct/data3"):
        get_reader("tvl", tmp_path)


# ------------------------------------------------------------------------------------ LLVIP
def test_llvip(tmp_path):
    fx.make_llvip(tmp_path)
    r = get_reader("llvip", tmp_path)
    train = r.records("train")
    assert [x.id for x in train] == ["010001", "010002", "010003"]  # list.txt ignored
    assert train[0].data["thermal"] == str(tmp_path / "llvip/LLVIP/infrared/train/010001.jpg")
    assert [x.id for x in r.records("test")] == ["190001", "190002"]
    assert r.missing_files(train) == [("010003", "thermal", str(tmp_path / "llvip/LLVIP/infrared/train/010003.jpg"))]
    assert r.records("train") == r.records("train")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        r.records("val")


def test_data_root_may_be_the_dataset_folder(tmp_path):
    fx.make_llvip(tmp_path)
    assert [x.id for x in get_reader("llvip", tmp_path / "llvip").records("test")] == ["190001", "190002"]


def test_fingerprint_ignores_paths_but_not_content(tmp_path):
    from cmcl.data.readers import fingerprint

    fx.make_ucf101(tmp_path / "a")
    fx.make_ucf101(tmp_path / "b", official=True)
    a, b = get_reader("ucf101", tmp_path / "a"), get_reader("ucf101", tmp_path / "b")
    assert fingerprint(a.records("train")) == fingerprint(b.records("train"))
    assert fingerprint(a.records("train")) != fingerprint(a.records("train")[1:])
    assert fingerprint(a.records("train")) != fingerprint(a.records("test"))
