"""Sweeps on one machine: --jobs (worker processes, bit-identical numbers, failures kept to their run)
and --grid (one run series per combination)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.sweep import expand_grid, threads_per_job
from tests.helpers import process_group


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _train(cache, protocol, runs, *extra):
    return invoke("train", "--features", cache, "--backbone", "synthetic", "--protocol", protocol, "--runs", runs,
                  "--epochs", "1", "--device", "cpu", *extra)


def _files(root: Path) -> dict[str, bytes]:
    """Every learner checkpoint and eval table of a runs folder (results.csv without its path column)."""
    out = {}
    for f in sorted(root.rglob("*")):
        rel = str(f.relative_to(root))
        if f.name in ("learners.safetensors", "eval.csv", "losses.csv"):
            out[rel] = f.read_bytes()
        elif f.name == "results.csv":
            out[rel] = pd.read_csv(f).drop(columns="run").to_csv(index=False).encode()
    return out


def test_jobs_give_the_numbers_of_one_job_bit_for_bit(tiny_cache, short_protocol, tmp_path):
    args = ("--strategy", "vanilla", "--strategy", "dns", "--seeds", "0,1", "--threads", "1", "-q")
    one = _train(tiny_cache, short_protocol, tmp_path / "one", *args, "--jobs", "1")
    assert one.exit_code == 0, one.output
    two = _train(tiny_cache, short_protocol, tmp_path / "two", *args, "--jobs", "2")
    assert two.exit_code == 0, two.output
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len([k for k in a if k.endswith("results.csv")]) == 4 and sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    # each run computed with the thread count asked for, in the worker too
    for metrics in (tmp_path / "two").rglob("metrics.json"):
        assert json.loads(metrics.read_text())["machine"]["threads"] == 1


def test_threads_default_to_the_cores_divided_between_jobs():
    cores = len(os.sched_getaffinity(0))
    assert threads_per_job(1) == cores and threads_per_job(cores * 4) == 1 and threads_per_job(2, 3) == 3


def test_a_failed_run_does_not_stop_the_others(tiny_cache, short_protocol, tmp_path):
    runs = tmp_path / "runs"
    first = _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "-q")
    assert first.exit_code == 0, first.output
    # vanilla seed 0 exists (no --resume): it fails; the other three runs finish
    for jobs in ("1", "2"):
        r = _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "--strategy", "dns", "--seeds", "0,1",
                   "--jobs", jobs, "--threads", "1", "-q")
        assert r.exit_code == 2, r.output
        assert "1 of 4 runs failed" in r.output and "vanilla seed 0: FAILED" in r.output
        assert "already exists; pass --resume" in r.output and "Traceback" not in r.output
        for label, seed in (("vanilla", 1), ("dns", 0), ("dns", 1)):
            assert (runs / "synthetic" / label / f"seed-{seed}" / "results.csv").is_file()
        for label in ("vanilla", "dns"):  # the next round starts afresh
            for seed in (0, 1):
                if (label, seed) != ("vanilla", 0):
                    import shutil
                    shutil.rmtree(runs / "synthetic" / label / f"seed-{seed}")
    # --resume picks everything up
    ok = _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "--strategy", "dns", "--seeds", "0,1",
                "--jobs", "2", "--threads", "1", "--resume", "-q")
    assert ok.exit_code == 0, ok.output
    assert len(list(runs.rglob("results.csv"))) == 4


def test_an_unexpected_error_exits_1_and_keeps_its_traceback(tiny_cache, short_protocol, tmp_path, monkeypatch):
    import cmcl.pipeline as pipeline

    real = pipeline.train_run

    def broken(plan, *args, **kwargs):
        if plan.cfg.strategy == "dns":
            raise ZeroDivisionError("a bug")
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_run", broken)
    r = CliRunner().invoke(cli, ["train", "--features", str(tiny_cache), "--backbone", "synthetic", "--protocol",
                                 str(short_protocol), "--runs", str(tmp_path / "runs"), "--epochs", "1",
                                 "--device", "cpu", "--strategy", "dns", "--strategy", "vanilla"])
    assert r.exit_code == 1, r.output
    assert "1 of 2 runs failed" in r.output and "ZeroDivisionError: a bug" in r.output
    assert (tmp_path / "runs" / "synthetic" / "vanilla" / "seed-0" / "results.csv").is_file()


def test_grid_expands_into_labelled_runs(tiny_cache, short_protocol, tmp_path):
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "dns", "--strategy", "vanilla",
               "--grid", "dns.lambda_min=0,0.1", "--grid", "lambda_left=0,0.5", "-q")
    assert r.exit_code == 0, r.output
    labels = sorted(p.name for p in (tmp_path / "runs" / "synthetic").iterdir())
    assert labels == ["dns[lambda_left=0,lambda_min=0.1]", "dns[lambda_left=0,lambda_min=0]",
                      "dns[lambda_left=0.5,lambda_min=0.1]", "dns[lambda_left=0.5,lambda_min=0]", "vanilla"]
    cfg = json.loads((tmp_path / "runs" / "synthetic" / "dns[lambda_left=0.5,lambda_min=0.1]" / "seed-0"
                      / "config.json").read_text())["config"]
    assert cfg["params"]["lambda_min"] == 0.1 and cfg["params"]["lambda_left"] == 0.5
    # the same label as -p gives: a grid point and a -p run are the same run
    p = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "dns", "-p", "lambda_min=0.1",
               "-p", "lambda_left=0.5", "-q")
    assert p.exit_code == 2 and "already exists" in p.output


@pytest.mark.parametrize("grid,message", [
    (("lambda_min=0.1,0.1",), "listed twice"),
    (("nope=1,2",), "unknown parameter 'nope'"),
    (("gem.lambda_min=1,2",), "strategy 'gem' is not selected"),
    (("lambda_min=",), "empty list"),
    (("lambda_min=0.1,2", "dns.lambda_min=3"), "already on the grid"),
    (("lambda_min=-1,0.1",), "lambda_min"),
])
def test_grid_errors_are_one_line(tiny_cache, short_protocol, tmp_path, grid, message):
    args = [a for g in grid for a in ("--grid", g)]
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "dns", *args, "-q")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "runs").exists()  # validated before anything is written


def test_grid_conflicts_with_p_and_label(tiny_cache, short_protocol, tmp_path):
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "dns", "-p", "lambda_min=0.1",
               "--grid", "lambda_min=0,1", "-q")
    assert r.exit_code == 2 and "also fixed with -p" in r.output
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "dns", "--label", "x",
               "--grid", "lambda_min=0,1", "-q")
    assert r.exit_code == 2 and "--label" in r.output


def test_expand_grid_is_the_product_in_order():
    assert expand_grid({}) == [{}]
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_workers_end_when_the_parent_is_killed(tiny_cache, short_protocol, tmp_path):
    args = ["-m", "cmcl", "train", "--features", str(tiny_cache), "--backbone", "synthetic", "--protocol",
            str(short_protocol), "--runs", str(tmp_path / "runs"), "--epochs", "200", "--device", "cpu", "--seeds",
            "0,1", "--jobs", "2", "--threads", "1", "-q"]
    workers: list[int] = []
    with process_group(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the pool's workers are up once the run folders appear
            workers = [c for c in _children(proc.pid) if b"cmcl" in Path(f"/proc/{c}/cmdline").read_bytes()
                       or b"multiprocessing" in Path(f"/proc/{c}/cmdline").read_bytes()]
            if len(list((tmp_path / "runs").rglob("config.json"))) >= 1 and workers:
                break
            time.sleep(0.2)
        assert workers, "no worker processes seen"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
