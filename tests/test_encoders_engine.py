"""The real encoders (tiny random weights) through the dataset readers and the extraction engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmcl.data.features import open_split
from cmcl.data.readers import get_reader
from cmcl.extract.encoders import load_encoder
from cmcl.extract.engine import extract
from tests import dataset_fixtures as fx

MAKERS = {"esc50": fx.make_esc50, "nyudv2": fx.make_nyudv2, "llvip": fx.make_llvip, "tvl": fx.make_tvl}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    for make in MAKERS.values():
        make(root)
    return root


CASES = [(b, d) for b in ("imagebind", "languagebind") for d in sorted(MAKERS)] + [("unibind", "llvip")]


@pytest.mark.parametrize(("backbone", "dataset"), CASES)
def test_engine_writes_a_valid_shard(backbone, dataset, data_root, tmp_path):
    enc = load_encoder(backbone, random_weights="tiny", device="cpu")
    # the LLVIP fixture holds one visible image without its infrared partner (a counted failure)
    results = extract(enc, dataset, "train", data_root, tmp_path, limit=3, batch_size=2, progress=False,
                      max_failures=1 if dataset == "llvip" else 0)
    assert len(results) == 1
    split = open_split(tmp_path, backbone, dataset, "train")
    assert 1 <= len(split) <= 3
    assert split.meta.dim == enc.dim and split.meta.extra["random_weights"] == "tiny"
    assert json.loads(split.meta.extra["preprocessing"])
    for m, x in split.emb.items():
        assert x.shape == (len(split), enc.dim)
        assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4), m
    # row i is the encoder's output for the record with id i, one item at a time (no batch effects,
    # no row shifted by the failed record or the batching)
    reader = get_reader(dataset, data_root, cache_dir=tmp_path / ".media")
    records = {r.id: r for r in reader.records("train")}
    for m, x in split.emb.items():
        for i, rid in enumerate(split.ids):
            want = enc.encode(m, [records[str(rid)].data[m]])[0]
            np.testing.assert_allclose(x[i], want, atol=2e-5, err_msg=f"{m} row {i} ({rid})")
    if dataset == "esc50":  # classes get text prototypes from the same encoder
        assert split.class_emb.shape == (50, enc.dim)
