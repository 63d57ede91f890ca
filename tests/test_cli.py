"""The command line: the quickstart end to end at tiny scale, and every bad input of issue 2 §9."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.data.features import shard_path
from cmcl.extract.synthetic import SyntheticConfig, write_synthetic


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = invoke("reproduce", "--out", out, "--scale", "0.02", "--dim", "64", "--seeds", "0,1", "--epochs", "1", "-q")
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out / "table2.csv")
    assert list(table["strategy"]) == ["vanilla", "dns"] and list(table["n"]) == [2, 2]
    for col in ("Acc_mean", "Acc_std", "BWT_A_mean", "R@1_mean", "R@5_mean", "R@10_mean", "BWT_R10_std"):
        assert np.isfinite(table[col]).all(), col
    assert (table["R@1_mean"] <= table["R@5_mean"]).all() and (table["R@5_mean"] <= table["R@10_mean"]).all()
    results = pd.read_csv(out / "results.csv")
    assert set(results.columns) == {"run", "backbone", "strategy", "seed", "trained_through", "eval_step", "dataset",
                                    "pair", "direction", "metric", "value"}
    assert results["trained_through"].max() == 11 and set(results["eval_step"]) == set(range(1, 12))
    assert not results.query("dataset == 'ucf101' and metric == 'R@10'").shape[0]   # ucf101: Acc only
    assert set(results.query("metric == 'acc'")["eval_step"]) == {1, 2, 5, 6}      # text pairs of acc datasets
    assert (out / "table2_heatmaps" / "synthetic_dns_R10.png").is_file()
    assert "vanilla" in r.output and "±" in r.output
    # running it again reuses the finished runs
    again = invoke("reproduce", "--out", out, "--scale", "0.02", "--dim", "64", "--seeds", "0,1", "--epochs", "1", "-q")
    assert again.exit_code == 0 and pd.read_csv(out / "table2.csv").equals(table)
    # the full-set recall protocol re-scores from checkpoints
    full = invoke("evaluate", "--runs", out / "runs", "--report", tmp_path / "full.csv", "--recall-protocol", "full",
                  "--no-plots", "-q")
    assert full.exit_code == 0, full.output
    t_full = pd.read_csv(tmp_path / "full.csv")
    assert (t_full["Acc_mean"] == table["Acc_mean"]).all()          # accuracy does not depend on pools
    info = invoke("info", out / "runs" / "synthetic" / "dns" / "seed-0")
    assert "11/11 steps finished" in info.output
    shard = invoke("info", out / "features" / "synthetic" / "esc50" / "test.h5")
    assert "check: ok" in shard.output and "classes 50" in shard.output


ONE_STEP = """
[[step]]
dataset = "esc50"
modalities = ["{a}", "{b}"]
"""


@pytest.fixture()
def small(tmp_path):
    root = tmp_path / "f"
    write_synthetic(root, SyntheticConfig(dim=64, scale=0.02), datasets=["esc50", "clotho"])
    proto = tmp_path / "p.toml"
    proto.write_text(ONE_STEP.format(a="text", b="audio"))
    return root, proto


def train(root, proto, tmp_path, *extra):
    return invoke("train", "--features", root, "--backbone", "synthetic", "--protocol", proto, "--runs",
                  tmp_path / "runs", "--epochs", "1", "-q", *extra)


def set_value(path, name, index, value):
    with h5py.File(path, "a") as f:
        f[name][index] = value


def replace_dataset(path, name, data):
    with h5py.File(path, "a") as f:
        del f[name]
        f.create_dataset(name, data=data)


def make_empty(path):
    with h5py.File(path, "a") as f:
        for name in ("ids", "labels", "emb/text", "emb/audio"):
            f[name].resize(0, axis=0)


def other_dim_test_split(root, tmp_path):
    other = tmp_path / "other"
    write_synthetic(other, SyntheticConfig(dim=72, scale=0.02), datasets=["esc50"])
    shutil.copy(shard_path(other, "synthetic", "esc50", "test"), shard_path(root, "synthetic", "esc50", "test"))


TEST = lambda root: shard_path(root, "synthetic", "esc50", "test")  # noqa: E731
TRAIN = lambda root: shard_path(root, "synthetic", "esc50", "train")  # noqa: E731

BAD = {
    "missing modality": (lambda root, p, t: p.write_text(ONE_STEP.format(a="text", b="depth")), "no modality 'depth'"),
    "dims differ between splits": (lambda root, p, t: other_dim_test_split(root, t), "differs from the other splits"),
    "nan embedding": (lambda root, p, t: set_value(TRAIN(root), "emb/audio", (3, 5), np.nan), "non-finite"),
    "inf embedding": (lambda root, p, t: set_value(TEST(root), "emb/text", (0, 0), np.inf), "non-finite"),
    "duplicate ids": (lambda root, p, t: set_value(TRAIN(root), "ids", 7, "train-000001"), "not unique"),
    "wrong schema": (lambda root, p, t: h5py.File(TEST(root), "a").attrs.__setitem__("schema", "cmcl.features/9"),
                     "schema is 'cmcl.features/9'"),
    "empty split": (lambda root, p, t: make_empty(TRAIN(root)), "empty"),
    "absent dataset": (lambda root, p, t: p.write_text(ONE_STEP.replace("esc50", "llvip").format(a="vision", b="thermal")),
                       "no such feature file"),
    "truncated hdf5": (lambda root, p, t: TRAIN(root).write_bytes(TRAIN(root).read_bytes()[:5000]), "corrupt or truncated"),
    "unknown strategy": (None, "unknown strategy 'dnss'"),
    "unknown parameter": (None, "unknown parameter 'lambda_mni'"),
    "dims differ between modalities": (
        lambda root, p, t: replace_dataset(TRAIN(root), "emb/audio", (np.ones((64, 60)) / np.sqrt(60)).astype(np.float32)),
        "shape"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(small, tmp_path, case):
    root, proto = small
    mutate, message = BAD[case]
    if mutate:
        mutate(root, proto, tmp_path)
    extra = {"unknown strategy": ["--strategy", "dnss"], "unknown parameter": ["-p", "lambda_mni=0.1"]}.get(case, [])
    r = train(root, proto, tmp_path, *extra)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cmcl: error:"), r.output
    assert message in lines[0], lines[0]
    if mutate and case not in ("missing modality", "absent dataset", "unknown strategy", "unknown parameter"):
        assert "esc50" in lines[0]  # names the file
    assert not list((tmp_path / "runs").rglob("step-01")) if (tmp_path / "runs").exists() else True


def test_resume_with_another_config_is_refused_and_keeps_the_run(small, tmp_path):
    root, proto = small
    assert train(root, proto, tmp_path).exit_code == 0
    results = next((tmp_path / "runs").rglob("results.csv"))
    before = results.read_bytes()
    r = train(root, proto, tmp_path, "--resume", "--lr", "0.5")
    assert r.exit_code == 2 and "different configuration (differs in lr)" in r.output
    assert results.read_bytes() == before
    r = train(root, proto, tmp_path)
    assert r.exit_code == 2 and "--resume" in r.output


def test_strategy_params_and_labels(small, tmp_path):
    root, proto = small
    r = train(root, proto, tmp_path, "--strategy", "vanilla,dns", "-p", "dns.lambda_min=0.5", "--seeds", "3")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "runs" / "synthetic" / "dns[lambda_min=0.5]" / "seed-3" / "results.csv").is_file()
    assert (tmp_path / "runs" / "synthetic" / "vanilla" / "seed-3" / "results.csv").is_file()
    listing = invoke("list", "strategies")
    assert "dns" in listing.output and "lambda_min=0.01" in listing.output
    assert invoke("list", "protocols").output.startswith("paper11: 11 steps")


def test_parse_params_scopes_and_types():
    from cmcl.cli import parse_params
    from cmcl.errors import ConfigError

    got = parse_params(("lambda_min=1e-3", "dns.project=update", "dns.project_bias=true"), ["vanilla", "dns"])
    assert got == {"vanilla": {}, "dns": {"lambda_min": 1e-3, "project": "update", "project_bias": True}}
    with pytest.raises(ConfigError, match="unknown parameter 'alpha'"):
        parse_params(("alpha=1",), ["vanilla", "dns"])
    with pytest.raises(ConfigError, match="not selected"):
        parse_params(("gem.margin=1",), ["dns"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_params(("lambda_min",), ["dns"])


@pytest.mark.parametrize("backbone", ["imagebind", "unibind", "languagebind"])
def test_real_encoder_extraction_through_the_cli(tmp_path, backbone):
    """A real encoder with tiny random weights on an LLVIP fixture: extract, inspect, verify, train (warns)."""
    from tests import dataset_fixtures

    dataset_fixtures.make_llvip(tmp_path / "data")
    out = tmp_path / "features"
    r = invoke("extract", "--backbone", backbone, "--random-weights", "tiny", "--device", "cpu", "--dataset",
               "llvip", "--data-root", tmp_path / "data", "--out", out, "--workers", "0", "--batch-size", "4", "-q",
               "--max-failures", "1")  # the fixture lacks one infrared image
    assert r.exit_code == 0, r.output
    assert "010003" in (out / backbone / "llvip" / "train.failures.csv").read_text()
    shard = shard_path(out, backbone, "llvip", "train")
    info = invoke("info", shard)
    assert "random_weights: tiny" in info.output and "check: ok" in info.output
    assert invoke("extract", "--verify", out, "--backbone", backbone, "--dataset", "llvip").exit_code == 0
    proto = tmp_path / "p.toml"
    proto.write_text('[[step]]\ndataset = "llvip"\nmodalities = ["vision", "thermal"]\n')
    r = invoke("train", "--features", out, "--backbone", backbone, "--protocol", proto, "--runs",
               tmp_path / "runs", "--epochs", "1", "--batch-size", "2", "--strategy", "vanilla")
    assert r.exit_code == 0, r.output
    assert "randomly initialised weights" in r.output


def test_check_checkpoint_through_the_cli(tmp_path, monkeypatch):
    """--check-checkpoint reads keys and shapes only: a tiny file does not fit the full-size model."""
    import torch

    from cmcl.extract.encoders.imagebind import ImageBindEncoder

    monkeypatch.delenv("CMCL_IMAGEBIND_CHECKPOINT", raising=False)
    tiny = ImageBindEncoder.load(random_weights="tiny", device="cpu")
    net = next(m for m in vars(tiny).values() if isinstance(m, torch.nn.Module))
    ckpt = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), ckpt)
    r = invoke("extract", "--backbone", "imagebind", "--checkpoint", ckpt, "--check-checkpoint")
    assert r.exit_code == 2 and "does not fit the imagebind architecture" in r.output
    assert "missing" in r.output or "shape" in r.output
    r = invoke("extract", "--backbone", "imagebind", "--checkpoint", tmp_path / "nope.pth", "--check-checkpoint")
    assert r.exit_code == 2 and "nope.pth" in r.output and "Traceback" not in r.output


def test_strategy_parameter_types_are_checked():
    from cmcl.errors import ConfigError
    from cmcl.train.strategies import resolve_params

    with pytest.raises(ConfigError, match="lambda_min expects a number, got 'abc'"):
        resolve_params("dns", {"lambda_min": "abc"})
    with pytest.raises(ConfigError, match="project_bias expects true or false"):
        resolve_params("dns", {"project_bias": 1})
    assert resolve_params("dns", {"lambda_min": 1})["lambda_min"] == 1.0
    assert resolve_params("dns", {"energy_in": 0.9})["energy_in"] == 0.9   # default None: any value
