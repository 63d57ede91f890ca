"""The trained space, used: the Python API, ``cmcl export`` and ``cmcl index build/search``."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import cmcl
from cmcl.cli import cli
from cmcl.data.features import open_split
from cmcl.data.importer import import_embeddings
from cmcl.errors import CMCLError, ConfigError, RunError
from cmcl.pipeline import train_one
from cmcl.train.config import TrainConfig
from cmcl.train.strategies import resolve_params

from conftest import SHORT_PROTOCOL
from tests.helpers import REPO, run_process


def _train(cache, root, seed=0, strategy="vanilla"):
    protocol = root / "short.toml"
    protocol.parent.mkdir(parents=True, exist_ok=True)
    protocol.write_text(SHORT_PROTOCOL)
    cfg = TrainConfig(features=str(cache), backbone="synthetic", strategy=strategy,
                      params=resolve_params(strategy, {}, "synthetic"), label=strategy, seed=seed,
                      protocol=str(protocol), epochs=1)
    return train_one(cfg, root / "runs")


@pytest.fixture(scope="module")
def trained(tiny_cache, tmp_path_factory):
    """A 3-step vanilla run on the tiny cache, and a second run (another seed) beside it."""
    root = tmp_path_factory.mktemp("api")
    return _train(tiny_cache, root), _train(tiny_cache, root, seed=1)


def test_public_names_and_lazy_import():
    assert set(cmcl.__all__) >= {"open_run", "open_split", "export_run", "Run"}
    for name in cmcl.__all__:
        assert getattr(cmcl, name) is not None
    with pytest.raises(AttributeError):
        cmcl.no_such_name  # noqa: B018
    proc = run_process(["-c", "import sys, cmcl; print([m for m in ('torch', 'faiss', 'cmcl.api') if m in sys.modules])"])
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_embed_is_the_step_learner(trained, tiny_cache):
    run_dir, _ = trained
    run = cmcl.open_run(run_dir)
    x = cmcl.open_split(tiny_cache, "synthetic", "esc50", "test", modalities=["text"]).emb["text"][:20]
    state = load_file(str(run_dir / "step-03" / "learners.safetensors"))
    expected = x @ state["layers.text.weight"].numpy().T + state["layers.text.bias"].numpy()
    z = run.embed("text", x)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(z, x, atol=1e-4)  # training moved the map
    t = run.embed("text", torch.from_numpy(x).double())
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.embed("text", x[0]), expected[0], rtol=1e-5, atol=1e-6)  # one vector
    s1 = load_file(str(run_dir / "step-01" / "learners.safetensors"))
    np.testing.assert_allclose(run.embed("text", x, step=1),
                               x @ s1["layers.text.weight"].numpy().T + s1["layers.text.bias"].numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(run.embed("audio", x, step=0), x)
    with pytest.raises(ConfigError, match="modality 'thermal' is not in the run"):
        run.embed("thermal", x)
    with pytest.raises(ConfigError, match="inputs have dim 32"):
        run.embed("text", x[:, :32])
    with pytest.raises(RunError, match="step 7 is not a finished step"):
        run.embed("text", x, step=7)


def test_metrics_and_config(trained):
    run_dir, _ = trained
    run = cmcl.open_run(run_dir)
    assert run.config["strategy"] == "vanilla" and run.config["seed"] == 0
    pd.testing.assert_frame_equal(run.metrics, pd.read_csv(run_dir / "results.csv"), check_dtype=False)
    assert run.modalities == ("text", "audio", "video") and run.steps == [1, 2, 3]
    with pytest.raises(RunError, match="not a run folder"):
        cmcl.open_run(run_dir.parent)


def test_export_applies_with_torch_and_safetensors_alone(trained, tiny_cache, tmp_path):
    run_dir, _ = trained
    res = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(tmp_path / "adapter"), "--step", "2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["step"] == 2 and meta["modalities"] == ["text", "audio", "video"] and meta["dim"] == 64
    assert meta["backbone"] == "synthetic" and meta["cmcl_version"] == cmcl.__version__
    assert {r["eval_step"] for r in meta["metrics"]} == {1, 2, 3}
    x = cmcl.open_split(tiny_cache, "synthetic", "clotho", "test", modalities=["audio"]).emb["audio"][:16]
    np.save(tmp_path / "x.npy", x)
    # the docs' recipe, in a fresh interpreter where cmcl cannot be imported
    code = ("import sys; sys.modules['cmcl'] = None\n"
            "import json, numpy as np, torch\nfrom safetensors.torch import load_file\n"
            f"d = {str(tmp_path)!r}\n"
            "w = load_file(d + '/adapter/learners.safetensors')\n"
            "x = torch.from_numpy(np.load(d + '/x.npy'))\n"
            "z = x @ w['audio.weight'].T + w['audio.bias']\n"
            "np.save(d + '/z.npy', z.numpy())\n")
    proc = run_process(["-c", code])
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), cmcl.open_run(run_dir).embed("audio", x, step=2),
                               rtol=1e-5, atol=1e-6)
    res = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(tmp_path / "x"), "--step", "9"])
    assert res.exit_code == 2 and "step 9 is not a finished step" in res.output


def test_docs_api_example_runs(trained, tiny_cache, tmp_path):
    """docs/api.md's Python example, run as written in a folder holding runs/ and features/."""
    run_dir, _ = trained
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert blocks
    shutil.copytree(run_dir.parents[2], tmp_path / "runs")  # runs/synthetic/vanilla/seed-0
    (tmp_path / "features").symlink_to(tiny_cache, target_is_directory=True)
    for i, code in enumerate(blocks):
        proc = run_process(["-c", code], cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, f"block {i}:\n{code}\n{proc.stderr}"


def _cli(args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res


def test_index_build_and_search(trained, tiny_cache, tmp_path):
    run_dir, _ = trained
    common = ["--run", run_dir, "--features", tiny_cache, "--dataset", "esc50", "--split", "test"]
    res = _cli(["index", "build", *common, "--modality", "audio", "--out", tmp_path / "idx"])
    assert res.exit_code == 0, res.output
    res = _cli(["index", "search", tmp_path / "idx", *common, "--modality", "text", "--k", "5",
                "--out", tmp_path / "hits.csv"])
    assert res.exit_code == 0, res.output
    hits = pd.read_csv(tmp_path / "hits.csv", dtype={"query_id": str, "hit_id": str})
    assert list(hits.columns) == ["query_id", "rank", "hit_id", "score"]
    split = open_split(tiny_cache, "synthetic", "esc50", "test", modalities=["text", "audio"])
    run = cmcl.open_run(run_dir)
    scores = run.embed("text", split.emb["text"]) @ run.embed("audio", split.emb["audio"]).T
    assert len(hits) == 5 * len(split) and set(hits["rank"]) == {1, 2, 3, 4, 5}
    top = hits[hits["rank"] == 1].set_index("query_id")
    best = scores.max(axis=1)
    np.testing.assert_allclose(top.loc[list(split.ids), "score"].to_numpy(), best, rtol=1e-4, atol=1e-4)
    first = {q: h for q, h in zip(top.index, top["hit_id"])}
    ids = list(split.ids)
    assert all(scores[i, ids.index(first[q])] >= best[i] - 1e-4 for i, q in enumerate(ids))
    # an approximate index over the same vectors finds nearly the same top hits
    res = _cli(["index", "build", *common, "--modality", "audio", "--kind", "hnsw", "--out", tmp_path / "hnsw"])
    assert res.exit_code == 0, res.output
    res = _cli(["index", "search", tmp_path / "hnsw", *common, "--modality", "text", "--k", "1",
                "--out", tmp_path / "hnsw.csv"])
    assert res.exit_code == 0, res.output
    approx = pd.read_csv(tmp_path / "hnsw.csv", dtype={"query_id": str, "hit_id": str}).set_index("query_id")
    assert (approx.loc[ids, "score"].to_numpy() >= best - 1e-4).mean() > 0.9
    res = _cli(["index", "build", *common, "--modality", "audio", "--kind", "ivf", "--nlist", "2", "--out", tmp_path / "ivf"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ivf" / "index.json").read_text())["kind"] == "ivf"
    res = _cli(["index", "search", tmp_path / "ivf", *common, "--modality", "text", "--k", "3", "--out", tmp_path / "ivf.csv"])
    assert res.exit_code == 0, res.output
    ivf = pd.read_csv(tmp_path / "ivf.csv", dtype={"query_id": str, "hit_id": str})
    assert set(ivf["query_id"]) == set(ids) and (ivf.groupby("query_id").size() <= 3).all()


def test_index_bad_inputs_get_one_line(trained, tiny_cache, tmp_path):
    run_dir, other = trained
    common = ["--features", tiny_cache, "--dataset", "esc50", "--split", "test"]
    assert _cli(["index", "build", "--run", run_dir, *common, "--modality", "audio", "--out", tmp_path / "idx"]).exit_code == 0

    def fails(args, message):
        res = _cli(args)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert message in res.output, res.output

    fails(["index", "build", "--run", run_dir, *common, "--modality", "thermal", "--out", tmp_path / "x"],
          "modality 'thermal' is not in the run")
    fails(["index", "search", tmp_path / "idx", "--run", other, *common, "--modality", "text", "--out",
           tmp_path / "h.csv"], "built from another run")
    fails(["index", "search", tmp_path, "--run", run_dir, *common, "--modality", "text", "--out", tmp_path / "h.csv"],
          "not an index folder")
    # embeddings of another width under the run's backbone
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cache = tmp_path / "narrow"
    import_embeddings(cache, "synthetic", "mine", "test", {"text": x, "audio": x})
    fails(["index", "search", tmp_path / "idx", "--run", run_dir, "--features", cache, "--dataset", "mine",
           "--split", "test", "--modality", "text", "--out", tmp_path / "h.csv"], "has dim 32, the run's learners 64")
    fails(["index", "build", "--run", run_dir, *common, "--modality", "audio", "--kind", "ivf", "--nlist", "100000",
           "--out", tmp_path / "ivf"], "nlist 100000 exceeds")
    assert issubclass(RunError, CMCLError)
