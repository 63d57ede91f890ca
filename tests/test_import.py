"""``cmcl import``: a feature-cache split from embeddings another tool computed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.data.features import open_split, shard_path


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    f = {"text": unit(rng, 10, 8), "audio": unit(rng, 10, 8), "classes": unit(rng, 3, 8),
         "labels": rng.integers(0, 3, 10)}
    for k, v in f.items():
        np.save(tmp_path / f"{k}.npy", v)
    (tmp_path / "ids.txt").write_text("".join(f"clip-{i}\n" for i in range(10)))
    (tmp_path / "names.txt").write_text("dog\ncat\nrain\n")
    return tmp_path, f


def run(*args):
    return CliRunner().invoke(cli, ["import", *[str(a) for a in args]])


def base(tmp, split="test"):
    return ["--out", tmp / "cache", "--backbone", "mine", "--dataset", "sounds", "--split", split]


def test_import_round_trips(files):
    tmp, f = files
    res = run(*base(tmp), "--emb", f"text={tmp / 'text.npy'}", "--emb", f"audio={tmp / 'audio.npy'}",
              "--ids", tmp / "ids.txt", "--labels", tmp / "labels.npy", "--class-names", tmp / "names.txt",
              "--class-emb", f"text={tmp / 'classes.npy'}")
    assert res.exit_code == 0, res.output
    split = open_split(tmp / "cache", "mine", "sounds", "test")
    assert split.meta.modalities == ("text", "audio") and split.meta.dim == 8 and split.meta.normalized
    np.testing.assert_array_equal(split.emb["text"], f["text"])
    np.testing.assert_array_equal(split.emb["audio"], f["audio"])
    assert list(split.ids) == [f"clip-{i}" for i in range(10)]
    np.testing.assert_array_equal(split.labels, f["labels"])
    assert list(split.class_names) == ["dog", "cat", "rain"]
    np.testing.assert_array_equal(split.class_emb, f["classes"])


def test_defaults_and_normalize(files):
    tmp, f = files
    raw = f["text"] * 3.0
    np.save(tmp / "raw.npy", raw)
    res = run(*base(tmp), "--emb", f"text={tmp / 'raw.npy'}", "--emb", f"audio={tmp / 'audio.npy'}")
    assert res.exit_code == 2 and "has norm 3.0000" in res.output and "--normalize" in res.output
    assert not shard_path(tmp / "cache", "mine", "sounds", "test").exists()
    res = run(*base(tmp), "--emb", f"text={tmp / 'raw.npy'}", "--emb", f"audio={tmp / 'audio.npy'}", "--normalize")
    assert res.exit_code == 0, res.output
    split = open_split(tmp / "cache", "mine", "sounds", "test")
    np.testing.assert_allclose(split.emb["text"], f["text"], atol=1e-6)
    assert list(split.ids) == [str(i) for i in range(10)] and (split.labels == -1).all()
    res = run(*base(tmp), "--emb", f"text={tmp / 'text.npy'}", "--emb", f"audio={tmp / 'audio.npy'}")
    assert res.exit_code == 2 and "already exists" in res.output
    res = run(*base(tmp), "--emb", f"text={tmp / 'text.npy'}", "--emb", f"audio={tmp / 'audio.npy'}", "--overwrite")
    assert res.exit_code == 0
    np.testing.assert_array_equal(open_split(tmp / "cache", "mine", "sounds", "test").emb["text"], f["text"])


def test_other_array_formats(files):
    tmp, f = files
    from safetensors.numpy import save_file

    np.savez(tmp / "both.npz", text=f["text"], audio=f["audio"])
    save_file({"emb": f["audio"]}, str(tmp / "audio.safetensors"))
    pd.DataFrame({"text": list(f["text"])}).to_parquet(tmp / "text.parquet")
    for i, (t, a) in enumerate([(tmp / "both.npz", tmp / "both.npz"), (tmp / "text.parquet", tmp / "audio.safetensors")]):
        res = run(*base(tmp, f"s{i}"), "--emb", f"text={t}", "--emb", f"audio={a}")
        assert res.exit_code == 0, res.output
        split = open_split(tmp / "cache", "mine", "sounds", f"s{i}")
        np.testing.assert_array_equal(split.emb["text"], f["text"])
        np.testing.assert_array_equal(split.emb["audio"], f["audio"])


BAD = {
    "nan": (lambda t, f: f["text"].__setitem__((4, 0), np.nan) or {"text": f["text"]}, [], "non-finite values"),
    "rows differ": (lambda t, f: {"audio": f["audio"][:9]}, [], "--emb audio: 9 rows but --emb text has 10"),
    "dims differ": (lambda t, f: {"audio": unit(np.random.default_rng(1), 10, 4)}, [], "dim 4 but --emb text has 8"),
    "1-d": (lambda t, f: {"audio": f["audio"][:, 0]}, [], "expected a non-empty 2-D array"),
    "strings": (lambda t, f: {"audio": np.array([["a"] * 8] * 10)}, [], "is not numeric"),
    "duplicate ids": (lambda t, f: (t / "ids.txt").write_text("a\nb\na\n" + "".join(f"x{i}\n" for i in range(7))) and {},
                      ["--ids", "ids.txt"], "id 'a' repeats (line 3)"),
    "too few ids": (lambda t, f: (t / "ids.txt").write_text("a\nb\n") and {}, ["--ids", "ids.txt"], "2 ids for 10 rows"),
    "empty id": (lambda t, f: (t / "ids.txt").write_text("a\n\nb\n") and {}, ["--ids", "ids.txt"], "line 2 is empty"),
    "label length": (lambda t, f: np.save(t / "labels.npy", np.zeros(3, int)) or {}, ["--labels", "labels.npy"],
                     "labels of shape (3,), expected (10,)"),
    "float labels": (lambda t, f: np.save(t / "labels.npy", np.zeros(10)) or {}, ["--labels", "labels.npy"],
                     "labels must be integers"),
    "negative labels": (lambda t, f: np.save(t / "labels.npy", np.full(10, -2)) or {}, ["--labels", "labels.npy"],
                        "labels must be >= 0 (or -1"),
    "labels past classes": (lambda t, f: np.save(t / "labels.npy", np.arange(10)) or {},
                            ["--labels", "labels.npy", "--class-names", "names.txt", "--class-emb", "text=classes.npy"],
                            "labels reach 9 but"),
    "names without prototypes": (lambda t, f: {}, ["--class-names", "names.txt"], "--class-names and --class-emb go together"),
    "prototype shape": (lambda t, f: np.save(t / "classes.npy", f["classes"][:2]) or {},
                        ["--class-names", "names.txt", "--class-emb", "text=classes.npy"], "shape (2, 8), expected (3, 8)"),
    "missing file": (lambda t, f: {"audio": None}, [], "audio.npy: no such file"),
    "unsupported": (lambda t, f: (t / "audio.csv").write_text("1,2\n") and {"audio": "csv"}, [],
                    "unsupported file type '.csv'"),
    "corrupt npy": (lambda t, f: (t / "audio.npy").write_bytes(b"garbage") and {}, [], "audio.npy: cannot read"),
    "no equals": (lambda t, f: {}, ["--emb", "audio"], "--emb 'audio': expected MODALITY=FILE"),
    "bad modality": (lambda t, f: {}, ["--emb", "Audio=audio.npy"], "invalid modality name 'Audio'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(files, case, monkeypatch):
    tmp, f = files
    monkeypatch.chdir(tmp)
    make, extra, message = BAD[case]
    changed = make(tmp, {k: v.copy() for k, v in f.items()})
    emb = {"text": "text.npy", "audio": "audio.npy"}
    for m, v in (changed or {}).items():
        if v is None:
            (tmp / f"{m}.npy").unlink()
        elif isinstance(v, str):
            emb[m] = f"{m}.{v}"
        else:
            np.save(tmp / f"{m}.npy", v)
    args = [*base(tmp)]
    if case not in ("no equals", "bad modality"):
        args += [a for m, p in emb.items() for a in ("--emb", f"{m}={p}")]
    res = run(*args, *extra)
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("cmcl: error:"), res.output
    assert message in res.output, res.output
    assert not (tmp / "cache" / "mine" / "sounds").exists() or not any((tmp / "cache" / "mine" / "sounds").glob("*.h5"))
