"""User-error paths of the command line: exit status 2, one line naming the problem, no traceback.

Each test gives one bad input and checks the message the user sees. Complements
``test_cli.py::test_bad_input_is_one_clear_line`` (bad feature files, unknown strategy/parameter).
"""

from __future__ import annotations

import shutil

import h5py
import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.data.features import shard_path
from cmcl.extract.synthetic import SyntheticConfig, write_synthetic

ONE_STEP = '[[step]]\ndataset = "esc50"\nmodalities = ["text", "audio"]\n'


def invoke(*args):
    # catch_exceptions=False: an unexpected exception fails the test with its traceback
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def user_error(r, *names: str) -> str:
    """Assert the one-line user error and that it names every string in ``names``; returns the line."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("cmcl: error:"), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture()
def small(tmp_path):
    """A private esc50 cache (tests below modify it) and a one-step protocol."""
    root = tmp_path / "f"
    write_synthetic(root, SyntheticConfig(dim=64, scale=0.02), datasets=["esc50"])
    proto = tmp_path / "p.toml"
    proto.write_text(ONE_STEP)
    return root, proto


def train(root, proto, runs, *extra):
    return invoke("train", "--features", root, "--backbone", "synthetic", "--protocol", proto, "--runs", runs,
                  "--epochs", "1", "-q", *extra)


# ----------------------------------------------------------------------------------- train options
def test_train_unknown_device(tiny_cache, short_protocol, tmp_path):
    r = train(tiny_cache, short_protocol, tmp_path / "runs", "--device", "tpu")
    user_error(r, "--device", "'tpu'")
    assert not (tmp_path / "runs").exists()


def test_train_cuda_device_without_cuda(tiny_cache, short_protocol, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = train(tiny_cache, short_protocol, tmp_path / "runs", "--device", "cuda:1")
    user_error(r, "--device cuda:1", "CUDA is not available")
    assert not (tmp_path / "runs").exists()


def test_evaluate_unknown_device(tmp_path):
    (tmp_path / "runs").mkdir()
    r = invoke("evaluate", "--runs", tmp_path / "runs", "--report", tmp_path / "t.csv", "--device", "gpu0")
    user_error(r, "--device", "'gpu0'")
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("spec", [("all,dns",), ("dns,all",), ("all", "vanilla")])
def test_strategy_all_combined_with_another(tiny_cache, short_protocol, tmp_path, spec):
    extra = [x for s in spec for x in ("--strategy", s)]
    r = train(tiny_cache, short_protocol, tmp_path / "runs", *extra)
    user_error(r, "--strategy all", "cannot be combined")
    assert not (tmp_path / "runs").exists()


def test_label_with_several_strategies(tiny_cache, short_protocol, tmp_path):
    r = train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "vanilla,dns", "--label", "mine")
    user_error(r, "--label", "single --strategy")
    assert not (tmp_path / "runs").exists()


def test_resume_with_overwrite(tiny_cache, short_protocol, tmp_path):
    r = train(tiny_cache, short_protocol, tmp_path / "runs", "--resume", "--overwrite")
    user_error(r, "--resume", "--overwrite")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("seeds", ["a,b", ",", "1;2"])
def test_unparsable_seeds(tiny_cache, short_protocol, tmp_path, seeds):
    r = train(tiny_cache, short_protocol, tmp_path / "runs", "--seeds", seeds)
    user_error(r, "--seeds")


def test_missing_protocol_file(tiny_cache, tmp_path):
    r = train(tiny_cache, tmp_path / "nope.toml", tmp_path / "runs")
    user_error(r, "nope.toml", "no such protocol file", "paper11")


def test_malformed_protocol_file(tiny_cache, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[step]]\ndataset = "esc50"\nmodalities = ["text", "text"]\n')
    r = train(tiny_cache, bad, tmp_path / "runs")
    user_error(r, "bad.toml", "step 1", "repeats a modality")


# ----------------------------------------------------------------------------------- extract
def test_extract_unknown_backbone(tmp_path):
    r = invoke("extract", "--backbone", "nosuchnet", "--out", tmp_path / "f", "--dataset", "esc50")
    line = user_error(r, "--backbone", "'nosuchnet'", "unknown")
    assert "imagebind" in line and "synthetic" in line      # lists the available ones
    assert not (tmp_path / "f").exists()


def test_extract_without_backbone(tmp_path):
    r = invoke("extract", "--out", tmp_path / "f")
    user_error(r, "--backbone is required")


# ----------------------------------------------------------------------------------- info
def test_info_on_a_missing_path(tmp_path):
    r = invoke("info", tmp_path / "nowhere")
    user_error(r, "nowhere")


def test_info_on_a_folder_that_is_nothing_of_cmcls(tmp_path):
    (tmp_path / "empty").mkdir()
    r = invoke("info", tmp_path / "empty")
    user_error(r, "empty", "neither a feature shard, a cache folder nor a run folder")


def test_info_on_a_file_that_is_not_hdf5(tmp_path):
    f = tmp_path / "notes.h5"
    f.write_text("not an hdf5 file\n")
    r = invoke("info", f)
    user_error(r, "notes.h5", "not a readable HDF5 file")


# ----------------------------------------------------------------------------------- evaluate
def evaluate(runs, tmp_path):
    return invoke("evaluate", "--runs", runs, "--report", tmp_path / "out" / "table2.csv", "--no-plots", "-q",
                  "--device", "cpu")


def test_evaluate_missing_runs_folder(tmp_path):
    user_error(evaluate(tmp_path / "missing", tmp_path), "missing", "no such runs folder")
    assert not (tmp_path / "out").exists()


def test_evaluate_empty_runs_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    user_error(evaluate(tmp_path / "runs", tmp_path), "runs", "no runs found")
    assert not (tmp_path / "out").exists()


def test_evaluate_only_incomplete_runs(small, tmp_path):
    root, proto = small
    assert train(root, proto, tmp_path / "runs").exit_code == 0
    run = tmp_path / "runs" / "synthetic" / "dns" / "seed-0"
    shutil.rmtree(run / "step-01")                        # as if killed during step 1
    (run / "results.csv").unlink()
    r = evaluate(tmp_path / "runs", tmp_path)
    # the error is one line; before it, even with -q, a warning names each skipped run and its progress
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("skipping incomplete run") and str(run) in lines[0], r.output
    assert "finished 0 of 1 steps" in lines[0]
    assert lines[1].startswith("cmcl: error:"), lines[1]
    for name in (str(tmp_path / "runs"), "no complete run to report", "1 incomplete"):
        assert name in lines[1], (name, lines[1])
    assert not (tmp_path / "out").exists()


def test_evaluate_unreadable_run_config(tmp_path):
    run = tmp_path / "runs" / "synthetic" / "dns" / "seed-0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{ not json")
    user_error(evaluate(tmp_path / "runs", tmp_path), "config.json", "not valid JSON")
    (run / "config.json").write_text('{"something": "else"}')
    user_error(evaluate(tmp_path / "runs", tmp_path), "config.json", "not a cmcl run config")


# ----------------------------------------------------------------------------------- --resume
def test_resume_after_the_protocol_file_changed(small, tmp_path):
    root, proto = small
    assert train(root, proto, tmp_path / "runs").exit_code == 0
    proto.write_text(ONE_STEP + 'metrics = ["recall"]\n')
    r = train(root, proto, tmp_path / "runs", "--resume")
    user_error(r, "seed-0", "--resume", "protocol")


def test_resume_after_the_features_were_re_extracted(small, tmp_path):
    root, proto = small
    assert train(root, proto, tmp_path / "runs").exit_code == 0
    summary = (tmp_path / "runs" / "synthetic" / "dns" / "seed-0" / "results.csv").read_bytes()
    # a later re-extraction: same file names, another creation time and other values
    write_synthetic(root, SyntheticConfig(dim=64, scale=0.02, seed=5), datasets=["esc50"], overwrite=True)
    with h5py.File(shard_path(root, "synthetic", "esc50", "train"), "a") as f:
        f.attrs["created_utc"] = "2031-01-01T00:00:00Z"
    r = train(root, proto, tmp_path / "runs", "--resume")
    user_error(r, "seed-0", "--resume", "feature files changed")
    assert (tmp_path / "runs" / "synthetic" / "dns" / "seed-0" / "results.csv").read_bytes() == summary


def test_resume_after_the_feature_values_changed_in_place(small, tmp_path):
    root, proto = small
    assert train(root, proto, tmp_path / "runs").exit_code == 0
    with h5py.File(shard_path(root, "synthetic", "esc50", "train"), "a") as f:
        f["emb/audio"][0] = -f["emb/audio"][0]             # still unit norm, other numbers
    r = train(root, proto, tmp_path / "runs", "--resume")
    user_error(r, "--resume", "esc50")
