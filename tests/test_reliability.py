"""Reliability through the command line: failed starts, option ranges, locks, kills and full disks.

Every user-facing failure is one line (``cmcl: error: ...``), exit status 2, no traceback, and
leaves nothing behind that blocks a retry; a killed or failed run resumes to the same numbers.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.data import locks
from cmcl.data.features import shard_path
from cmcl.extract.synthetic import SyntheticConfig, write_synthetic
from tests.helpers import process_group, run_process

TWO_STEPS = """
[[step]]
dataset = "esc50"
modalities = ["text", "audio"]

[[step]]
dataset = "clotho"
modalities = ["text", "audio"]
"""


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(r, *needles: str) -> str:
    """Assert exit status 2 and a single ``cmcl: error:`` line containing every needle; return it."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(("cmcl: error:", "Error:")), r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def cache(tmp_path):
    root = tmp_path / "f"
    write_synthetic(root, SyntheticConfig(dim=64, scale=0.02), datasets=["esc50", "clotho"])
    proto = tmp_path / "p.toml"
    proto.write_text(TWO_STEPS)
    return root, proto


def train_args(root, proto, runs, *extra):
    return ["train", "--features", root, "--backbone", "synthetic", "--protocol", proto, "--runs", runs,
            "--epochs", "1", "--batch-size", "16", "-q", *extra]


def results(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "results.csv").drop(columns=["run"])


# ------------------------------------------------------------------------------------ failed starts
def test_a_bad_feature_file_leaves_nothing_and_the_fixed_retry_runs(cache, tmp_path):
    root, proto = cache
    path = shard_path(root, "synthetic", "clotho", "train")
    with h5py.File(path, "a") as f:
        good = f["emb/audio"][4].copy()
        f["emb/audio"][4] = np.nan
    runs = tmp_path / "runs"
    one_line_error(invoke(*train_args(root, proto, runs, "--strategy", "vanilla")), "clotho", "non-finite")
    assert not runs.exists()  # validated before anything was created
    with h5py.File(path, "a") as f:
        f["emb/audio"][4] = good
    r = invoke(*train_args(root, proto, runs, "--strategy", "vanilla"))
    assert r.exit_code == 0, r.output
    assert (runs / "synthetic" / "vanilla" / "seed-0" / "results.csv").is_file()


def test_a_bad_strategy_parameter_creates_no_run_folder(cache, tmp_path):
    root, proto = cache
    runs = tmp_path / "runs"
    one_line_error(invoke(*train_args(root, proto, runs, "-p", "lambda_min=-1")), "dns", "lambda_min")
    one_line_error(invoke(*train_args(root, proto, runs, "--strategy", "vanilla", "--strategy", "gem",
                                      "-p", "gem.margin=-1")), "gem", "margin")
    assert not runs.exists()


def test_a_run_with_no_finished_step_is_restarted_by_a_plain_retry(cache, tmp_path):
    root, proto = cache
    runs = tmp_path / "runs"
    args = train_args(root, proto, runs, "--strategy", "vanilla")
    assert invoke(*args).exit_code == 0
    run = runs / "synthetic" / "vanilla" / "seed-0"
    expected = results(run)
    # what an interrupted start leaves: config.json and the step-0 evaluation, no trained step
    for p in run.iterdir():
        if p.name not in ("config.json", "step-00"):
            p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(results(run), expected)
    # with a finished step, a plain retry is refused (it would lose work) and names the way on
    one_line_error(invoke(*args), str(run), "--resume")


# ------------------------------------------------------------------------------------ option ranges
RANGES = [
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay"),
    (["train", "--temperature", "0"], "--temperature"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--batch-size", "1"], "--batch-size"),
    (["train", "--seeds", "-1"], "--seeds"),
    (["train", "--seeds", "0,0"], "--seeds"),
    (["train", "--seeds", "a"], "--seeds"),
    (["train", "--device", "gpu"], "--device"),
    (["train", "--device", "cuda:x"], "--device"),
    (["train", "--strategy", "all,dns"], "--strategy all"),
    (["train", "--strategy", "vanilla", "--strategy", "dns", "--label", "x"], "--label"),
    (["train", "--resume", "--overwrite"], "--resume"),
    (["train", "-p", "dns.lambda_min=nan"], "finite"),
    (["train", "-p", "lambda_min"], "key=value"),
    (["extract", "--backbone", "synthetic", "--seed", "-3"], "--seed"),
    (["extract", "--backbone", "synthetic", "--scale", "0"], "--scale"),
    (["extract", "--backbone", "synthetic", "--dim", "8"], "--dim"),
    (["extract", "--backbone", "nosuch", "--out", "x"], "nosuch"),
    (["reproduce", "--data-seed", "-1"], "--data-seed"),
    (["reproduce", "--lr", "-1"], "--lr"),
]


@pytest.mark.parametrize("args,needle", RANGES, ids=[" ".join(a) for a, _ in RANGES])
def test_every_bad_option_value_is_one_line(args, needle, cache, tmp_path):
    root, proto = cache
    if args[0] == "train":
        args = train_args(root, proto, tmp_path / "runs") + args[1:]
    elif args[0] == "extract" and "--out" not in args:
        args = args + ["--out", str(tmp_path / "out")]
    elif args[0] == "reproduce":
        args = args + ["--out", str(tmp_path / "qs")]
    one_line_error(invoke(*args), needle)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists() and not (tmp_path / "qs").exists()


# ------------------------------------------------------------------------------------ locks
@contextmanager
def lock_held_by_another_process(path: Path, what: str):
    """A second, real process holding the lock of ``path`` until the block ends (then it is killed)."""
    code = (f"import sys, time\nfrom cmcl.data.locks import acquire\nacquire({str(path)!r}, {what!r})\n"
            "print('locked', flush=True)\ntime.sleep(120)\n")
    with process_group(["-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "locked"
        yield


def test_a_run_folder_written_by_another_process_is_busy(cache, tmp_path):
    root, proto = cache
    runs = tmp_path / "runs"
    run = runs / "synthetic" / "vanilla" / "seed-0"
    args = [str(a) for a in train_args(root, proto, runs, "--strategy", "vanilla")]
    with lock_held_by_another_process(run, "run folder"):
        proc = run_process(["-m", "cmcl", *args], timeout=120)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert str(run) in line and "busy" in line
        assert not run.exists()
    # the holder died: the lock went with it, and the same command runs
    r = invoke(*args)
    assert r.exit_code == 0, r.output


def test_a_feature_file_written_by_another_process_is_busy(tmp_path):
    out = tmp_path / "f"
    target = shard_path(out, "synthetic", "esc50", "train")
    args = ["extract", "--backbone", "synthetic", "--out", out, "--dataset", "esc50", "--dim", "64",
            "--scale", "0.02", "-q"]
    with lock_held_by_another_process(target, "feature file"):
        proc = run_process(["-m", "cmcl", *map(str, args)], timeout=120)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip()
        assert "\n" not in line and str(target) in line and "busy" in line
        assert not target.exists() and not target.with_name(target.name + ".partial").exists()
    assert invoke(*args).exit_code == 0 and target.is_file()


def test_locks_are_reentrant_within_a_process_and_exclusive_across(tmp_path):
    path = tmp_path / "thing"
    with locks.exclusive(path, "thing"):
        with locks.exclusive(path, "thing"):  # nested writers of one process share the lock
            pass
        probe = run_process(["-c", f"from cmcl.data.locks import acquire\nacquire({str(path)!r}, 'thing')"],
                            timeout=60)
        assert probe.returncode != 0 and "busy" in probe.stderr
    probe = run_process(["-c", f"from cmcl.data.locks import acquire\nacquire({str(path)!r}, 'thing')"], timeout=60)
    assert probe.returncode == 0, probe.stderr


# ------------------------------------------------------------------------------------ kills
@pytest.fixture()
def uninterrupted(cache, tmp_path):
    root, proto = cache
    runs = tmp_path / "full"
    assert invoke(*train_args(root, proto, runs, "--strategy", "dns")).exit_code == 0
    return results(runs / "synthetic" / "dns" / "seed-0")


# two steps of ~64 pairs at batch 16 are 4-5 updates each; evaluations: step 0, 1, 2
@pytest.mark.parametrize("point", ["mid-step:2", "mid-step:6", "learners:1", "strategy:2", "eval:2", "eval:3"])
def test_sigkill_then_resume_gives_the_uninterrupted_numbers(point, cache, uninterrupted, tmp_path):
    root, proto = cache
    runs = tmp_path / "killed"
    args = [str(a) for a in train_args(root, proto, runs, "--strategy", "dns")]
    proc = run_process(["-m", "tests.train_kill_child", point, "--", *args], timeout=180)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: {proc.returncode} {proc.stderr[-2000:]}"
    run = runs / "synthetic" / "dns" / "seed-0"
    assert not (run / "results.csv").exists()
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(results(run), uninterrupted)
    assert not list(run.glob("*.tmp"))


# ------------------------------------------------------------------------------------ full disk, no permission
def test_a_full_disk_while_writing_a_step_is_one_line_and_resumable(cache, uninterrupted, tmp_path, monkeypatch):
    from cmcl.data import runs as checkpoint

    root, proto = cache
    runs = tmp_path / "runs"
    args = train_args(root, proto, runs, "--strategy", "dns")
    real, calls = checkpoint.save_file, {"n": 0}

    def save_file(state, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2's learners
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(state, filename, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = runs / "synthetic" / "dns" / "seed-0"
    line = one_line_error(invoke(*args), "step-02.tmp", "No space left on device")
    assert str(run) in line
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "step-00", "step-01"]  # no partial step
    monkeypatch.setattr(checkpoint, "save_file", real)
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(results(run), uninterrupted)


def test_an_unwritable_runs_folder_is_one_line(cache, tmp_path, monkeypatch):
    root, proto = cache
    runs = tmp_path / "runs"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(runs)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    one_line_error(invoke(*train_args(root, proto, runs, "--strategy", "vanilla")), str(runs), "Permission denied")
    assert not runs.exists()


def test_a_full_disk_while_rewriting_a_feature_file_keeps_the_old_one(tmp_path, monkeypatch):
    from cmcl.data.features import FeatureWriter

    out = tmp_path / "f"
    args = ["extract", "--backbone", "synthetic", "--out", out, "--dataset", "esc50", "--dim", "64", "--scale", "0.02",
            "-q"]
    assert invoke(*args).exit_code == 0
    target = shard_path(out, "synthetic", "esc50", "train")
    before = target.read_bytes()

    def append(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.partial))

    monkeypatch.setattr(FeatureWriter, "append", append)
    one_line_error(invoke(*args, "--overwrite", "--seed", "1"), "train.h5.partial", "No space left on device")
    assert target.read_bytes() == before  # the previous file is untouched and usable
    assert not target.with_name(target.name + ".partial").exists()
