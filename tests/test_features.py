"""Feature cache: round trips, shards, validation and atomic writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cmcl.data import features
from cmcl.data.features import (FeatureShard, FeatureWriter, ShardMeta, check_embeddings, check_split, list_cache,
                                open_split, shard_path, write_split)
from cmcl.errors import CacheError


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def meta(split="train", mods=("text", "audio"), dim=8, **kw):
    return ShardMeta(backbone="anybackbone", dataset="toy", split=split, dim=dim, modalities=mods, **kw)


def write_toy(root, split="train", n=20, dim=8, seed=0, ids=None, **kw):
    rng = np.random.default_rng(seed)
    emb = {"text": unit(rng, n, dim), "audio": unit(rng, n, dim)}
    ids = ids if ids is not None else [f"s{i}" for i in range(n)]
    path = shard_path(root, "anybackbone", "toy", split)
    write_split(path, meta(split, dim=dim), ids, np.arange(n) % 3, emb, text=[f"t{i}" for i in range(n)],
                class_names=["a", "b", "c"], class_emb={"text": unit(rng, 3, dim)}, **kw)
    return path, emb


def test_round_trip(tmp_path):
    path, emb = write_toy(tmp_path)
    feats = open_split(tmp_path, "anybackbone", "toy", "train")
    assert list(feats.ids) == [f"s{i}" for i in range(20)]
    np.testing.assert_array_equal(feats.labels, np.arange(20) % 3)
    np.testing.assert_array_equal(feats.emb["audio"], emb["audio"])
    assert feats.text[3] == "t3"
    assert list(feats.class_names) == ["a", "b", "c"] and feats.class_emb.shape == (3, 8)
    with FeatureShard(path) as shard:
        assert shard.meta.backbone == "anybackbone" and shard.meta.dim == 8
        assert set(shard.meta.modalities) == {"text", "audio"}
        attrs = h5py.File(path, "r").attrs
        assert attrs["schema"] == "cmcl.features/1" and "created_utc" in attrs and attrs["checkpoint"] == ""
    assert not path.with_name(path.name + ".partial").exists()


def test_shards_read_as_one_split(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for r in range(3):
        path = shard_path(tmp_path, "b", "toy", "train", r, 3)
        ids = [f"r{r}-{i}" for i in range(5)]
        x = {"text": unit(rng, 5, 8), "audio": unit(rng, 5, 8)}
        rows.append(x["audio"])
        write_split(path, ShardMeta("b", "toy", "train", 8, ("text", "audio")), ids, np.zeros(5), x)
    feats = open_split(tmp_path, "b", "toy", "train", modalities=["audio"])
    assert len(feats) == 15 and feats.ids[5] == "r1-0"
    np.testing.assert_array_equal(feats.emb["audio"], np.concatenate(rows))
    assert [e.split for e in list_cache(tmp_path)] == ["train"]
    shard_path(tmp_path, "b", "toy", "train", 1, 3).unlink()
    with pytest.raises(CacheError, match="missing"):
        open_split(tmp_path, "b", "toy", "train")


def test_float16_storage_is_accepted(tmp_path):
    path, emb = write_toy(tmp_path)
    with h5py.File(path, "a") as f:
        data = f["emb/audio"][()]
        del f["emb/audio"]
        f.create_dataset("emb/audio", data=data.astype(np.float16))
    feats = open_split(tmp_path, "anybackbone", "toy", "train")
    assert feats.emb["audio"].dtype == np.float32
    np.testing.assert_allclose(feats.emb["audio"], emb["audio"], atol=1e-3)


@pytest.mark.parametrize("corrupt, message", [
    (lambda f: f["emb/audio"].__setitem__((2, 3), np.nan), "non-finite"),
    (lambda f: f["emb/audio"].__setitem__((2,), np.full(8, 3.0, np.float32)), "norm"),
    (lambda f: f.attrs.__setitem__("schema", "cmcl.features/0"), "schema"),
    (lambda f: f["ids"].__setitem__(4, "s0"), "not unique"),
    (lambda f: f.attrs.__setitem__("dim", 9), "shape"),
    (lambda f: f.__delitem__("labels"), "labels"),
])
def test_bad_shards_name_file_and_problem(tmp_path, corrupt, message):
    path, _ = write_toy(tmp_path)
    with h5py.File(path, "a") as f:
        corrupt(f)
    with pytest.raises(CacheError, match=message) as err:
        open_split(tmp_path, "anybackbone", "toy", "train")
    assert str(path) in str(err.value)


def test_missing_modality_and_truncated_file(tmp_path):
    path, _ = write_toy(tmp_path)
    with pytest.raises(CacheError, match="no modality 'video'"):
        open_split(tmp_path, "anybackbone", "toy", "train", modalities=["video"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="corrupt or truncated") as err:
        open_split(tmp_path, "anybackbone", "toy", "train")
    assert str(path) in str(err.value)


def test_writer_validates_and_leaves_nothing_half_written(tmp_path):
    path = shard_path(tmp_path, "b", "toy", "train")
    rng = np.random.default_rng(0)
    with pytest.raises(CacheError, match="not unique"):
        with FeatureWriter(path, meta()) as w:
            w.append(["a", "a"], [0, 0], {"text": unit(rng, 2, 8), "audio": unit(rng, 2, 8)})
    assert not path.exists() and not list(path.parent.glob("*.partial"))
    with pytest.raises(CacheError, match="empty split"):
        with FeatureWriter(path, meta()):
            pass
    with pytest.raises(CacheError, match="modalities"):
        with FeatureWriter(path, meta()) as w:
            w.append(["a"], [0], {"text": unit(rng, 1, 8)})
    assert not path.exists()
    write_toy(tmp_path)
    existing = shard_path(tmp_path, "anybackbone", "toy", "train")
    before = existing.read_bytes()
    with pytest.raises(CacheError, match="already exists"):
        write_toy(tmp_path)
    assert existing.read_bytes() == before


def test_single_file_and_shards_together_is_an_error(tmp_path):
    write_toy(tmp_path)
    rng = np.random.default_rng(0)
    write_split(shard_path(tmp_path, "anybackbone", "toy", "train", 0, 1), meta(), ["x"], [0],
                {"text": unit(rng, 1, 8), "audio": unit(rng, 1, 8)})
    with pytest.raises(CacheError, match="keep one form"):
        open_split(tmp_path, "anybackbone", "toy", "train")


def test_dims_differing_between_shards(tmp_path):
    rng = np.random.default_rng(0)
    for r, d in enumerate((8, 6)):
        write_split(shard_path(tmp_path, "b", "toy", "train", r, 2), ShardMeta("b", "toy", "train", d, ("text",)),
                    [f"{r}"], [0], {"text": unit(rng, 1, d)})
    with pytest.raises(CacheError, match="dim"):
        open_split(tmp_path, "b", "toy", "train")


def test_file_written_by_another_tool_as_documented(tmp_path):
    """docs/feature-cache.md's h5py recipe produces a file cmcl reads (any backbone name)."""
    rng = np.random.default_rng(0)
    n, d = 30, 16
    ids = [f"clip{i}" for i in range(n)]
    labels = np.arange(n) % 5
    text_emb, audio_emb, class_text_emb = unit(rng, n, d), unit(rng, n, d), unit(rng, 5, d)
    class_names = [f"c{i}" for i in range(5)]
    folder = tmp_path / "features" / "mymodel" / "esc50"
    folder.mkdir(parents=True)
    with h5py.File(folder / "test.h5.partial", "w") as f:
        s = h5py.string_dtype("utf-8")
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=s)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("emb/text", data=text_emb.astype(np.float32))
        f.create_dataset("emb/audio", data=audio_emb.astype(np.float32))
        f.create_dataset("classes/names", data=np.array(class_names, dtype=object), dtype=s)
        f.create_dataset("classes/emb/text", data=class_text_emb.astype(np.float32))
        f.attrs.update(schema="cmcl.features/1", backbone="mymodel", dataset="esc50", split="test",
                       dim=text_emb.shape[1], normalized=True, cmcl_version="mytool 1.0",
                       created_utc="2026-11-26T00:00:00Z", checkpoint="")
        f.attrs.create("modalities", ["text", "audio"], dtype=s)
    (folder / "test.h5.partial").rename(folder / "test.h5")
    feats = open_split(tmp_path / "features", "mymodel", "esc50", "test")
    assert len(feats) == n and feats.meta.cmcl_version == "mytool 1.0"
    np.testing.assert_array_equal(feats.class_emb, class_text_emb)


def test_the_value_check_flags_exactly_the_arrays_with_a_non_finite_value():
    """The one-pass check (row sums of squares) against the definition, ``np.isfinite(x).all()``:
    every NaN or infinity is found in its first row, and finite values large enough to overflow
    the squares are not mistaken for one."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        x = rng.standard_normal((int(rng.integers(1, 40)), 16)).astype(np.float32)
        if trial % 3:
            bad = rng.choice(x.size, size=int(rng.integers(1, 4)), replace=False)
            x.flat[bad] = rng.choice([np.nan, np.inf, -np.inf], size=len(bad))
        if trial % 4 == 0:
            x[rng.integers(len(x))] *= 1e30   # finite, but its square overflows float32
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(rows) == 0:
            check_embeddings(x, "x", normalized=False)
            continue
        with pytest.raises(CacheError, match=rf"x: non-finite values \(NaN or inf\), first in row {rows[0] + 7}$"):
            check_embeddings(x, "x", normalized=False, first_row=7)
    with pytest.raises(CacheError, match="row 2 has norm inf"):
        check_embeddings(np.array([[1, 0], [0, 1], [3e30, 0]], np.float32), "x", normalized=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_split_checked_block_by_block_fails_as_loading_it_does(tmp_path, dtype, monkeypatch):
    path, emb = write_toy(tmp_path, n=20)
    with h5py.File(path, "a") as f:
        data = f["emb/audio"][()]
        del f["emb/audio"]
        f.create_dataset("emb/audio", data=data.astype(dtype))
    monkeypatch.setattr(features, "_CHECK_BLOCK_BYTES", 3 * 4 * 8)   # blocks of 3 rows of 8 floats
    assert check_split(tmp_path, "anybackbone", "toy", "train").dim == 8
    for row, value, problem in ((13, np.nan, "non-finite values"), (19, 2.0, "declared normalized")):
        with h5py.File(path, "a") as f:
            f["emb/audio"][row, 5] = value
        messages = []
        for read in (open_split, check_split):
            with pytest.raises(CacheError) as err:
                read(tmp_path, "anybackbone", "toy", "train")
            messages.append(str(err.value))
        assert messages[0] == messages[1] and f"/emb/audio: {problem}" in messages[0] and f"row {row}" in messages[0]
        with h5py.File(path, "a") as f:
            f["emb/audio"][row] = data[row]


def test_checking_a_protocol_holds_no_train_split_whole(tmp_path, monkeypatch):
    """``StepData.check`` validates every train split before training starts, a block at a time:
    the memory it allocates stays far below one train split's embeddings."""
    import tracemalloc

    from cmcl.data.paired import StepData
    from cmcl.data.protocol import load_protocol
    from cmcl.extract.synthetic import SyntheticConfig, write_synthetic

    write_synthetic(tmp_path / "f", SyntheticConfig(dim=256, scale=0.05, seed=0))
    proto = tmp_path / "p.toml"
    proto.write_text('name = "p"\n[datasets]\nnyudv2 = { metrics = ["recall"] }\n'
                     '[[step]]\ndataset = "nyudv2"\nmodalities = ["vision", "depth"]\n')
    data = StepData(tmp_path / "f", "synthetic", load_protocol(str(proto)))
    data.test_sets()
    split_bytes = sum(x.nbytes for x in open_split(tmp_path / "f", "synthetic", "nyudv2", "train").emb.values())
    monkeypatch.setattr(features, "_CHECK_BLOCK_BYTES", 64 << 10)
    tracemalloc.start()
    try:
        data.check()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert split_bytes > (2 << 20) and peak < split_bytes / 4, (peak, split_bytes)
    with h5py.File(tmp_path / "f" / "synthetic" / "nyudv2" / "train.h5", "a") as f:
        f["emb/depth"][len(f["emb/depth"]) - 1, 0] = np.inf
    with pytest.raises(CacheError, match=r"nyudv2/train.h5: /emb/depth: non-finite"):
        StepData(tmp_path / "f", "synthetic", load_protocol(str(proto))).check()


def test_the_steps_of_a_dataset_share_its_tensors_and_a_finished_dataset_is_released(tiny_cache, tmp_path):
    """``StepData.train`` hands every step of a dataset the very same tensor per modality (DNS
    recognises its inputs by them) and keeps one dataset at a time: the previous one's tensors die
    once its steps are done."""
    import gc
    import weakref

    from cmcl.data.paired import StepData
    from cmcl.data.protocol import load_protocol

    proto = tmp_path / "p.toml"
    proto.write_text('name = "p"\n[datasets]\nvggsound_s = { metrics = ["recall"] }\nclotho = { metrics = ["recall"] }\n'
                     '[[step]]\ndataset = "vggsound_s"\nmodalities = ["text", "audio"]\n'
                     '[[step]]\ndataset = "vggsound_s"\nmodalities = ["audio", "video"]\n'
                     '[[step]]\ndataset = "clotho"\nmodalities = ["text", "audio"]\n')
    data = StepData(tiny_cache, "synthetic", load_protocol(str(proto)))
    first, second, third = data.protocol.steps
    audio = data.train(first).xb
    assert data.train(second).xa is audio
    gone = weakref.ref(audio)
    del audio
    gc.collect()
    assert gone() is not None            # the loader still holds vggsound_s
    data.train(third)
    gc.collect()
    assert gone() is None                # clotho replaced it
