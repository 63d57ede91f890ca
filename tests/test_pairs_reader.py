"""The ``pairs`` reader: your own paired media from a CSV or JSONL manifest, embedded like any dataset."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.data.features import open_split
from cmcl.data.readers import get_reader, parse_reader_options
from cmcl.errors import DatasetError
from tests import dataset_fixtures as fx

ROWS = [
    {"id": "a", "vision": "img/a.png", "audio": "snd/a.wav", "text": "a dog barks", "split": "train", "class": "dog"},
    {"id": "b", "vision": "img/b.png", "audio": "snd/b.wav", "text": "rain on a roof", "split": "train", "class": "rain"},
    {"id": "c", "vision": "img/c.png", "audio": "snd/c.wav", "text": "a cat, purring", "split": "test", "class": "cat"},
    {"id": "d", "vision": "img/d.png", "audio": "snd/d.wav", "text": "another dog", "split": "test", "class": "dog"},
]


@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "mine"
    for r in ROWS:
        fx.write_image(root / r["vision"], r["id"])
        fx.write_wav(root / r["audio"], r["id"])
    with open(root / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def test_csv_and_jsonl_manifests_give_the_same_records(media, tmp_path):
    a = get_reader("pairs", tmp_path, manifest=str(media / "pairs.csv"), dataset="mine")
    b = get_reader("pairs", media, manifest="pairs.jsonl", dataset="mine")  # relative to the data root
    assert a.name == "mine" and a.modalities == ("vision", "audio", "text") and a.splits == ("test", "train")
    assert a.class_names() == ["cat", "dog", "rain"]
    for split in ("train", "test"):
        assert a.records(split) == b.records(split)
    train = a.records("train")
    assert [r.id for r in train] == ["a", "b"] and [r.label for r in train] == [1, 2]
    assert train[0].data["vision"] == str(media / "img" / "a.png") and train[0].data["text"] == "a dog barks"
    assert a.missing_files(train) == []
    p = get_reader("pairs", media, manifest="pairs.csv", prompt="a sound of a {}")
    assert p.class_texts() == ["a sound of a cat", "a sound of a dog", "a sound of a rain"]


def test_defaults_without_optional_columns(tmp_path):
    (tmp_path / "m.csv").write_text("text,audio\nhello,x.wav\nworld,y.wav\n")
    r = get_reader("pairs", tmp_path, manifest="m.csv", modalities="audio,text", default_split="test")
    assert r.name == "pairs" and r.splits == ("test",) and r.modalities == ("audio", "text")
    recs = r.records("test")
    assert [x.id for x in recs] == ["0", "1"] and all(x.label == -1 for x in recs) and not r.has_classes
    assert parse_reader_options("pairs", ["manifest=m.csv", "dataset=x"]) == {"manifest": "m.csv", "dataset": "x"}


@pytest.mark.parametrize("content, options, message", [
    (None, {}, "give the manifest with --reader-option manifest=FILE"),
    (None, {"manifest": "nope.csv"}, "nope.csv does not exist"),
    ("Image,text\nx.png,hi\n", {"manifest": "m.csv"}, "column 'Image': invalid modality name"),
    ("id\nx\n", {"manifest": "m.csv"}, "no column for modality"),
    ("text,audio\n", {"manifest": "m.csv"}, "the manifest has no rows"),
    ("text,audio\nhi,x.wav\n", {"manifest": "m.csv", "modalities": "vision"}, "no column for modality ['vision']"),
])
def test_bad_manifests_at_construction(tmp_path, content, options, message):
    if content is not None:
        (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError) as err:
        get_reader("pairs", tmp_path, **options)
    assert message in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("text,audio\n,x.wav\n", "row 1 (id '0'): empty 'text'"),
    ("text,audio,label\nhi,x.wav,two\n", "label 'two' is not an integer"),
    ("text,audio,class\nhi,x.wav,\n", "empty 'class'"),
])
def test_bad_rows_name_the_row(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError) as err:
        get_reader("pairs", tmp_path, manifest="m.csv").records("train")
    assert message in str(err.value)


def test_extract_pairs_through_the_cli(media, tmp_path):
    out = tmp_path / "features"
    res = CliRunner().invoke(cli, ["extract", "--backbone", "imagebind", "--random-weights", "tiny", "--device", "cpu",
                                   "--dataset", "pairs", "--data-root", str(media), "--reader-option",
                                   "manifest=pairs.csv", "--reader-option", "dataset=mine", "--out", str(out),
                                   "--workers", "0", "--batch-size", "2", "-q"])
    assert res.exit_code == 0, res.output
    for split, ids in (("train", ["a", "b"]), ("test", ["c", "d"])):
        s = open_split(out, "imagebind", "mine", split)
        assert list(s.ids) == ids and set(s.emb) == {"vision", "audio", "text"}
        assert np.allclose(np.linalg.norm(s.emb["audio"], axis=1), 1, atol=1e-4)
        assert list(s.class_names) == ["cat", "dog", "rain"] and s.class_emb.shape == (3, s.meta.dim)
    assert list(open_split(out, "imagebind", "mine", "test").labels) == [0, 1]
    res = CliRunner().invoke(cli, ["extract", "--backbone", "imagebind", "--random-weights", "tiny", "--device", "cpu",
                                   "--dataset", "pairs", "--data-root", str(media), "--out", str(out), "-q"])
    assert res.exit_code == 2 and "give the manifest" in res.output and len(res.output.strip().splitlines()) == 1
