"""Additions to the feature cache used by the extraction engine: per-block checks, shard names."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from cmcl.data.features import FeatureShard, FeatureWriter, ShardMeta, parse_shard_name, shard_path
from cmcl.errors import CacheError

META = ShardMeta(backbone="b", dataset="d", split="train", dim=4, modalities=("text", "audio"))


def unit(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def h5_contents(path):
    """Every dataset (as an array) and every attribute of an HDF5 file, by name."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_check_blocks_writes_the_same_file(tmp_path):
    meta = dataclasses.replace(META, created_utc="2026-01-01T00:00:00Z")   # the only field that would differ
    paths = {}
    for check_blocks in (False, True):
        paths[check_blocks] = tmp_path / f"{check_blocks}.h5"
        with FeatureWriter(paths[check_blocks], meta, check_blocks=check_blocks) as w:
            w.append(["a", "b"], [0, 1], {"text": unit(2), "audio": unit(2, 1)})
            w.append(["c"], [1], {"text": unit(1, 2), "audio": unit(1, 3)})
            w.set_classes(["x", "y"], {"text": unit(2, 4)})
        with FeatureShard(paths[check_blocks]) as sh:
            assert sh.ids.tolist() == ["a", "b", "c"]
            np.testing.assert_array_equal(sh.load("audio"), np.concatenate([unit(2, 1), unit(1, 3)]))
            sh.check(embeddings=False)
            sh.check()
    plain, checked = h5_contents(paths[False]), h5_contents(paths[True])
    assert set(plain) == set(checked) and {"ids", "labels", "emb/text", "emb/audio", "classes/emb/text"} <= set(plain)
    for name in plain:
        if name == "/attrs":
            assert plain[name] == checked[name]
        else:
            np.testing.assert_array_equal(plain[name], checked[name], err_msg=name)


def test_check_blocks_rejects_bad_rows_at_append(tmp_path):
    bad = unit(3)
    bad[1] = np.nan
    with pytest.raises(CacheError, match=r"/emb/audio rows 2-4: non-finite values.*row 1"):
        with FeatureWriter(tmp_path / "x.h5", META, check_blocks=True) as w:
            w.append(["a", "b"], [0, 0], {"text": unit(2), "audio": unit(2)})
            w.append(["c", "d", "e"], [0, 0, 0], {"text": unit(3), "audio": bad})
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()
    with pytest.raises(CacheError, match="norm"):
        with FeatureWriter(tmp_path / "y.h5", META, check_blocks=True) as w:
            w.append(["a"], [0], {"text": unit(1), "audio": 2 * unit(1)})


def test_check_blocks_still_checks_ids_at_close(tmp_path):
    with pytest.raises(CacheError, match="not unique"):
        with FeatureWriter(tmp_path / "x.h5", META, check_blocks=True) as w:
            w.append(["a", "a"], [0, 0], {"text": unit(2), "audio": unit(2)})


def test_structural_check_without_embeddings(tmp_path):
    path = tmp_path / "x.h5"
    with FeatureWriter(path, META) as w:
        w.append(["a"], [0], {"text": unit(1), "audio": unit(1)})
    with FeatureShard(path) as sh:
        with pytest.raises(CacheError, match="no modality 'video'"):
            sh.check(["video"], embeddings=False)


def test_parse_shard_name():
    assert parse_shard_name(shard_path("r", "b", "d", "test", 3, 8).name) == ("test", 3, 8)
    assert parse_shard_name("train.h5") is None
    assert parse_shard_name("my-split-00000-of-00002.h5") == ("my-split", 0, 2)
