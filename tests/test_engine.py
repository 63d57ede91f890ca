"""The extraction engine: resume after kills, bad media, rank sharding, existing shards, verify."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import dataset_fixtures as fx
from tests.helpers import run_process
from cmcl.data.features import FeatureShard, open_split, split_files
from cmcl.data.readers import get_reader
from cmcl.errors import ExtractError
from cmcl.extract.encoders.filehash import FileHashEncoder
from cmcl.extract.engine import extract, read_failures, resolve_shard, shard_bounds, shard_from_env
from cmcl.extract.verify import verify

RUN = dict(batch_size=4, commit_every=8, progress=False)


@pytest.fixture(scope="module")
def clotho_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fx.make_clotho(root, n_dev=27)  # 30 development rows, 2 evaluation rows (one WAV missing)
    return root


@pytest.fixture(scope="module")
def reference(clotho_root, tmp_path_factory):
    """An uninterrupted run to compare everything against."""
    out = tmp_path_factory.mktemp("ref")
    extract(FileHashEncoder(), "clotho", "train", clotho_root, out, **RUN)
    return open_split(out, "filehash", "clotho", "train")


def same_split(a, b):
    assert a.ids.tolist() == b.ids.tolist()
    assert a.labels.tolist() == b.labels.tolist()
    assert (a.text is None and b.text is None) or a.text.tolist() == b.text.tolist()
    assert set(a.emb) == set(b.emb)
    for m in a.emb:
        np.testing.assert_array_equal(a.emb[m], b.emb[m])
    if a.class_names is not None or b.class_names is not None:
        assert a.class_names.tolist() == b.class_names.tolist()
        np.testing.assert_array_equal(a.class_emb, b.class_emb)


def test_uninterrupted_run(reference, clotho_root):
    assert len(reference) == 30
    assert reference.ids.tolist() == sorted(reference.ids.tolist())
    assert set(reference.emb) == {"text", "audio"}
    caption = reference.text[reference.ids.tolist().index("rain on roof")]
    assert caption == 'Rain falls, steadily "and" softly, on a roof.'
    assert (reference.labels == -1).all()
    meta = reference.meta
    assert meta.backbone == "filehash" and meta.dim == 64 and meta.extra["expected_records"] == 30
    # rows are the encoder's embedding of the inputs
    enc = FileHashEncoder()
    i = reference.ids.tolist().index("a")
    np.testing.assert_allclose(reference.emb["audio"][i],
                               enc.encode("audio", [str(clotho_root / "clotho/development/a.wav")])[0], atol=1e-6)
    assert not (Path(reference.paths[0]).parent / "train.h5.parts").exists()


# ------------------------------------------------------------------------------------ kills
def kill_at(point: str, root, out, workers: int = 0) -> None:
    """Run an extraction in a fresh interpreter that dies at ``point``; it must die there (exit 9)."""
    proc = run_process(["-m", "tests.engine_kill_child", point, str(root), str(out), str(workers)], timeout=120)
    assert proc.returncode == 9, f"the child did not die at {point} (exit {proc.returncode}): {proc.stderr[-2000:]}"


@pytest.mark.parametrize("point", ["encode:1", "encode:5", "part-write:2", "after-part:1", "after-part:3",
                                   "assemble:2", "after-rename"])
def test_resume_after_kill_gives_identical_shard(point, clotho_root, reference, tmp_path):
    kill_at(point, clotho_root, tmp_path)
    target = tmp_path / "filehash" / "clotho" / "train.h5"
    assert not target.exists() or point == "after-rename"
    [res] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, **RUN)
    expect_resume = {"encode:1": 0, "encode:5": 16, "part-write:2": 8, "after-part:1": 8, "after-part:3": 24,
                     "assemble:2": 30, "after-rename": 30}
    assert res.resumed_at == expect_resume[point]
    assert res.status == ("resumed" if res.resumed_at else "written")
    same_split(open_split(tmp_path, "filehash", "clotho", "train"), reference)
    leftovers = sorted(p.name for p in target.parent.iterdir() if not p.name.startswith("."))  # not the lock
    assert leftovers == ["train.failures.csv", "train.h5"]
    assert verify(tmp_path, datasets=["clotho"], splits=["train"], data_root=clotho_root).ok


def test_resume_after_kill_with_worker_processes(clotho_root, reference, tmp_path):
    kill_at("encode:4", clotho_root, tmp_path, workers=2)
    [res] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, workers=2, **RUN)
    assert res.resumed_at == 8
    same_split(open_split(tmp_path, "filehash", "clotho", "train"), reference)


def test_workers_and_batching_do_not_change_rows(clotho_root, reference, tmp_path):
    extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, workers=2, batch_size=7,
            commit_every=5, progress=False)
    same_split(open_split(tmp_path, "filehash", "clotho", "train"), reference)


def test_resume_refuses_other_settings(clotho_root, tmp_path):
    kill_at("after-part:1", clotho_root, tmp_path)
    with pytest.raises(ExtractError, match=r"different \['batch_size'\]"):
        extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, batch_size=2, commit_every=8,
                progress=False)
    [res] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, batch_size=2, commit_every=8,
                    progress=False, overwrite=True)
    assert res.status == "written" and res.rows == 30


def test_existing_shard_is_kept_or_overwritten(clotho_root, tmp_path):
    [a] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, limit=5, **RUN)
    [b] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, limit=5, **RUN)
    assert (a.status, b.status, b.rows) == ("written", "exists", 5)
    with pytest.raises(ExtractError, match="other records"):
        extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, limit=6, **RUN)
    [c] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, limit=6, overwrite=True, **RUN)
    assert c.status == "written" and c.rows == 6


# ------------------------------------------------------------------------------------ bad media
@pytest.fixture
def bad_llvip(tmp_path):
    fx.make_llvip(tmp_path)  # 010003 has no infrared partner
    base = tmp_path / "llvip" / "LLVIP"
    for k in range(4, 12):
        fx.write_image(base / "visible" / "train" / f"0100{k:02d}.jpg")
        fx.write_image(base / "infrared" / "train" / f"0100{k:02d}.jpg")
    good = (base / "infrared" / "train" / "010005.jpg").read_bytes()
    (base / "infrared" / "train" / "010005.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (base / "visible" / "train" / "010007.jpg").write_bytes(b"not an image at all")  # undecodable
    return tmp_path


def test_bad_media_go_to_the_failures_manifest(bad_llvip, tmp_path):
    out = tmp_path / "features"
    run = dict(batch_size=2, commit_every=2, progress=False)
    with pytest.raises(ExtractError, match=r"3 input\(s\) failed, more than --max-failures 2.*resumes at record 6"):
        extract(FileHashEncoder(), "llvip", "train", bad_llvip, out, max_failures=2, **run)
    assert len(read_failures(out / "filehash" / "llvip" / "train.failures.csv")) == 3  # listed at once
    [res] = extract(FileHashEncoder(), "llvip", "train", bad_llvip, out, max_failures=3, **run)
    assert res.rows == 8 and res.expected == 11 and res.status == "resumed" and res.resumed_at == 6
    fails = {f.id: f for f in read_failures(res.failures_path)}
    assert res.failures_path == out / "filehash" / "llvip" / "train.failures.csv"
    assert sorted(fails) == ["010003", "010005", "010007"]
    assert fails["010003"].error == "missing file" and fails["010003"].modality == "thermal"
    assert fails["010003"].path.endswith("infrared/train/010003.jpg")
    assert fails["010005"].modality == "thermal" and "truncated" in fails["010005"].error.lower()
    assert fails["010007"].modality == "vision" and "UnidentifiedImageError" in fails["010007"].error
    split = open_split(out, "filehash", "llvip", "train")
    assert split.text is None and "010005" not in split.ids.tolist() and len(split) == 8
    assert verify(out, datasets=["llvip"], splits=["train"], data_root=bad_llvip).ok


def test_non_finite_embeddings_are_failures(clotho_root, tmp_path, monkeypatch):
    orig = FileHashEncoder.encode_batch

    def encode_batch(self, m, b):
        x = orig(self, m, b)
        if m == "audio":
            x[0] = np.nan
        return x
    monkeypatch.setattr(FileHashEncoder, "encode_batch", encode_batch)
    [res] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, limit=8, max_failures=5, **RUN)
    assert res.rows == 6 and [f.error for f in res.failures] == ["non-finite embedding"] * 2


def test_every_input_failing_is_an_error(clotho_root, tmp_path):
    with pytest.raises(ExtractError, match="every input of this shard failed"):
        extract(FileHashEncoder(), "clotho", "test", clotho_root, tmp_path, limit=1, max_failures=5, **RUN)
    [f] = read_failures(tmp_path / "filehash" / "clotho" / "test.failures.csv")
    assert (f.id, f.error) == ("missing clip", "missing file")


def test_encoder_must_cover_the_modalities(clotho_root, tmp_path):
    with pytest.raises(ExtractError, match=r"cannot embed \['audio'\]"):
        extract(FileHashEncoder(modalities=("text", "vision")), "clotho", "train", clotho_root, tmp_path, **RUN)


# ------------------------------------------------------------------------------------ ranks
def test_rank_resolution():
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert resolve_shard(None, None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert resolve_shard(2, 5, {"RANK": "1", "WORLD_SIZE": "2"}) == (2, 5)
    with pytest.raises(ExtractError):
        resolve_shard(2, None, {})
    with pytest.raises(ExtractError):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    bounds = [shard_bounds(10, s, 3) for s in range(3)]
    assert bounds == [(0, 3), (3, 6), (6, 10)]


@pytest.mark.parametrize("how", ["torchrun", "job-array"])
def test_two_ranks_cover_every_id_once(how, clotho_root, reference, tmp_path):
    for rank in (1, 0):  # order does not matter: no rank waits on another
        if how == "torchrun":
            kw = dict(environ={"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
        else:
            kw = dict(num_shards=2, shard=rank, environ={})
        [res] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, **kw, **RUN)
        assert res.path.name == f"train-{rank:05d}-of-00002.h5" and res.rows == 15
    assert [p.name for p in split_files(tmp_path, "filehash", "clotho", "train")] == \
           ["train-00000-of-00002.h5", "train-00001-of-00002.h5"]
    same_split(open_split(tmp_path, "filehash", "clotho", "train"), reference)
    assert verify(tmp_path, datasets=["clotho"], splits=["train"], data_root=clotho_root).ok
    # a single-file run of the same split would make it ambiguous
    with pytest.raises(ExtractError, match="another sharding"):
        extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, environ={}, **RUN)


def test_under_torchrun(clotho_root, reference, tmp_path):
    """Two real torchrun processes (CPU): each rank writes its shard from RANK/WORLD_SIZE."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from cmcl.extract.engine import extract, describe\n"
        "from cmcl.extract.encoders.filehash import FileHashEncoder\n"
        "for r in extract(FileHashEncoder(), 'clotho', 'train', sys.argv[1], sys.argv[2], batch_size=4,\n"
        "                 commit_every=8, progress=False):\n"
        "    print(describe(r))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(clotho_root), str(tmp_path / "f")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train-00000-of-00002.h5" in proc.stdout and "train-00001-of-00002.h5" in proc.stdout
    same_split(open_split(tmp_path / "f", "filehash", "clotho", "train"), reference)


# ------------------------------------------------------------------------------------ classes
def test_accuracy_dataset_gets_labels_and_prototypes(tmp_path):
    fx.make_ucf101(tmp_path / "data")
    results = extract(FileHashEncoder(), "ucf101", "all", tmp_path / "data", tmp_path / "f", **RUN)
    assert [r.split for r in results] == ["train", "test"]
    test = open_split(tmp_path / "f", "filehash", "ucf101", "test")
    assert test.class_names.tolist() == ["ApplyEyeMakeup", "TaiChi", "YoYo"]
    enc = FileHashEncoder()
    np.testing.assert_allclose(test.class_emb, enc.encode("text", ["apply eye makeup", "tai chi", "yo yo"]), atol=1e-6)
    # the prototype of a class is the text embedding of its samples, so text rows match it
    for i, label in enumerate(test.labels):
        np.testing.assert_allclose(test.emb["text"][i], test.class_emb[label], atol=1e-6)
    assert test.text.tolist().count("yo yo") == 2


def test_esc50_parquet_end_to_end(tmp_path):
    fx.make_esc50(tmp_path / "data")
    before = fx.tree_digest(tmp_path / "data")
    [res] = extract(FileHashEncoder(), "esc50", "test", tmp_path / "data", tmp_path / "f", limit=12, **RUN)
    assert res.rows == 12
    split = open_split(tmp_path / "f", "filehash", "esc50", "test")
    assert len(split.class_names) == 50
    assert (tmp_path / "f" / ".media").is_dir()  # the WAVs from parquet went to the cache, not the data
    assert fx.tree_digest(tmp_path / "data") == before
    assert verify(tmp_path / "f", datasets=["esc50"], splits=["test"], data_root=tmp_path / "data").ok


# ------------------------------------------------------------------------------------ verify
def test_verify_catches_truncated_missing_and_unfinished(clotho_root, tmp_path):
    out = tmp_path / "f"
    extract(FileHashEncoder(), "clotho", "all", clotho_root, out, max_failures=1, **RUN)
    rep = verify(out, datasets=["clotho"], data_root=clotho_root)
    assert rep.ok, rep.format()
    assert "filehash/clotho/test: 1 rows in 1 file(s), 1 failed input(s) listed" in rep.format()
    # missing datasets are listed when asked for
    rep = verify(out, datasets=["clotho", "llvip"])
    assert [p.split(":")[0] for p in rep.problems] == ["filehash/llvip/train", "filehash/llvip/test"]
    # a truncated shard
    shard = out / "filehash" / "clotho" / "train.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    rep = verify(out, datasets=["clotho"])
    assert not rep.ok and any("train" in p and "truncated" in p for p in rep.problems), rep.format()
    # a lost failures manifest no longer accounts for the assigned records
    (out / "filehash" / "clotho" / "test.failures.csv").unlink()
    rep = verify(out, datasets=["clotho"], splits=["test"])
    assert "1 rows + 0 failures = 1, but 2 records were assigned" in rep.problems[0]
    # an unfinished run is reported
    (out / "filehash" / "clotho" / "train.h5.parts").mkdir()
    assert any("unfinished" in p for p in verify(out, datasets=["clotho"]).problems)


def test_verify_compares_ids_with_the_reader(clotho_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(clotho_root, data)
    out = tmp_path / "f"
    extract(FileHashEncoder(), "clotho", "train", data, out, **RUN)
    with open(data / "clotho" / "clotho_captions_development.csv", "a", encoding="utf-8") as fh:
        fh.write("new clip.wav,new,n,n,n,n\n")
    rep = verify(out, datasets=["clotho"], splits=["train"], data_root=data)
    assert "1 of the reader's 31 ids are neither stored nor listed as failed: 'new clip'" in rep.problems[0]


def test_verify_reports_wrong_schema(tmp_path):
    folder = tmp_path / "bb" / "llvip"
    folder.mkdir(parents=True)
    with h5py.File(folder / "train.h5", "w") as h:
        h.attrs["schema"] = "other/9"
    rep = verify(tmp_path, datasets=["llvip"], splits=["train"])
    assert "schema is 'other/9'" in rep.problems[0]


def test_shard_attributes_record_the_run(clotho_root, tmp_path):
    [res] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, limit=10, num_shards=3, shard=2,
                    environ={}, **RUN)
    with FeatureShard(res.path) as sh:
        extra = sh.meta.extra
    assert (int(extra["shard"]), int(extra["num_shards"]), int(extra["limit"])) == (2, 3, 10)
    assert int(extra["records_offset"]) == 6 and int(extra["expected_records"]) == 4
    reader = get_reader("clotho", clotho_root)
    assert res.path.name == "train-00002-of-00003.h5"
    assert [r.id for r in reader.records("train")[6:10]] == [str(i) for i in open_split_ids(res.path)]


def open_split_ids(path):
    with FeatureShard(path) as sh:
        return sh.ids.tolist()


# ------------------------------------------------------------------------------------ all seven
def _fake_ffmpeg(folder: Path) -> str:
    fake = folder / "fake-ffmpeg"  # "extracts" a short WAV track from any input; no binary needed
    fake.write_text(f"#!{sys.executable}\nimport sys, wave\n"
                    "with wave.open(sys.argv[-1], 'wb') as w:\n"
                    "    w.setnchannels(2); w.setsampwidth(2); w.setframerate(44100)\n"
                    "    w.writeframes(open(sys.argv[sys.argv.index('-i') + 1], 'rb').read()[:400])\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize("dataset", ["ucf101", "esc50", "nyudv2", "clotho", "vggsound_s", "tvl", "llvip"])
def test_every_dataset_extracts_end_to_end(dataset, tmp_path):
    from cmcl.data.catalog import DATASETS

    data, out = tmp_path / "data", tmp_path / "features"
    make = {"ucf101": fx.make_ucf101, "esc50": fx.make_esc50, "nyudv2": fx.make_nyudv2, "clotho": fx.make_clotho,
            "vggsound_s": fx.make_vggsound, "tvl": fx.make_tvl, "llvip": fx.make_llvip}[dataset]
    make(data)
    options = {"vggsound_s": {"select": "available", "cap_train": 4, "cap_test": 3,
                              "ffmpeg": _fake_ffmpeg(tmp_path)}}.get(dataset, {})
    before = fx.tree_digest(data)
    limit = 40 if dataset == "esc50" else None
    results = extract(FileHashEncoder(), dataset, "all", data, out, limit=limit, max_failures=5,
                      reader_options=options, **RUN)
    assert fx.tree_digest(data) == before  # extraction never writes into the dataset
    info = DATASETS[dataset]
    for res in results:
        split = open_split(out, "filehash", dataset, res.split)
        assert split.meta.modalities == info.modalities
        assert len(split) == res.rows == res.expected - len({f.id for f in res.failures}) > 0
        has_text = dataset != "llvip"
        assert (split.text is not None) == has_text
        if info.n_classes > 0:
            assert len(split.class_names) == info.n_classes if dataset == "esc50" else len(split.class_names) > 1
            assert (split.labels >= 0).all()
        else:
            assert split.class_names is None and (split.labels == -1).all()
    failed = sorted(f.id for r in results for f in r.failures)
    assert failed == {"clotho": ["missing clip"], "llvip": ["010003"]}.get(dataset, [])
    rep = verify(out, datasets=[dataset], data_root=data, reader_options={dataset: options})
    assert rep.ok, rep.format()


def test_vggsound_manifest_clip_gone_is_a_failure_not_a_substitute(tmp_path):
    from cmcl.data.readers.vggsound_s import freeze_manifest

    data = tmp_path / "data"
    fx.make_vggsound(data)
    manifest = freeze_manifest(data, tmp_path / "subset.csv", cap_train=3, cap_test=2)
    final = data / "vggsound/scratch/shared/beegfs/hchen/train_data/VGGSound_final"
    (final / "video" / "--0PQM4-hqg_000030.mp4").unlink()
    [res] = extract(FileHashEncoder(), "vggsound_s", "train", data, tmp_path / "f", max_failures=2,
                    reader_options={"manifest": str(manifest), "ffmpeg": _fake_ffmpeg(tmp_path)}, **RUN)
    assert [(f.id, f.modality, f.error) for f in res.failures] == [("--0PQM4-hqg_000030", "video", "missing file")]
    split = open_split(tmp_path / "f", "filehash", "vggsound_s", "train")
    assert split.ids.tolist() == ["--5OkAjCI7g_000040", "--8puiAGLhs_000030"]
    assert split.class_names.tolist() == sorted({"waterfall burbling", "bird chirping, tweeting",
                                                 "car engine starting", "people marching"})


def test_item_with_an_odd_preprocessed_shape_is_a_failure(clotho_root, tmp_path, monkeypatch):
    from cmcl.extract.encoders import filehash

    orig = filehash._preprocess

    def preprocess(modality, item):
        x = orig(modality, item)
        return x[:7] if modality == "audio" and str(item).endswith("clip 004.wav") else x
    monkeypatch.setattr(filehash, "_preprocess", preprocess)
    [res] = extract(FileHashEncoder(), "clotho", "train", clotho_root, tmp_path, max_failures=1, **RUN)
    [f] = res.failures
    assert (f.id, f.modality) == ("clip 004", "audio") and "shape (7,)" in f.error and res.rows == 29
