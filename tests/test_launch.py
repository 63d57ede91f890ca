"""--launcher (submitit; the local executor here, end to end through the CLI) and `cmcl status`."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.data import locks
from cmcl.data import runs as run_files

pytestmark = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                reason="the slurm extra is not installed (pip install 'cmcl[slurm]')")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _train(cache, protocol, runs, *extra):
    return invoke("train", "--features", cache, "--backbone", "synthetic", "--protocol", protocol, "--runs", runs,
                  "--epochs", "1", "--device", "cpu", *extra)


def test_local_launcher_runs_every_job_and_status_reports_them(tiny_cache, short_protocol, tmp_path):
    runs = tmp_path / "runs"
    r = _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "--strategy", "dns", "--seeds", "0,1",
               "--launcher", "local", "--wait")
    assert r.exit_code == 0, r.output
    jobs = run_files.read_jobs(runs)
    assert sorted(jobs) == ["synthetic/dns/seed-0", "synthetic/dns/seed-1", "synthetic/vanilla/seed-0",
                            "synthetic/vanilla/seed-1"]
    assert len({j["job_id"] for j in jobs.values()}) == 4 and all(j["launcher"] == "local" for j in jobs.values())
    for key in jobs:
        assert (runs / key / "results.csv").is_file() and (runs / key / "summary.json").is_file()
    s = invoke("status", runs)
    assert s.exit_code == 0 and "4 finished, 0 running, 0 failed, 0 missing" in s.output
    # a job's numbers are those of the same run trained here
    here = _train(tiny_cache, short_protocol, tmp_path / "here", "--strategy", "dns", "--seeds", "1", "--threads", "1",
                  "-q")
    assert here.exit_code == 0
    for i in (1, 2, 3):
        a = (runs / "synthetic/dns/seed-1" / f"step-{i:02d}" / "learners.safetensors").read_bytes()
        b = (tmp_path / "here/synthetic/dns/seed-1" / f"step-{i:02d}" / "learners.safetensors").read_bytes()
        assert a == b


def test_failed_job_is_reported_and_a_resubmission_resumes(tiny_cache, short_protocol, tmp_path):
    runs = tmp_path / "runs"
    # a finished run made with other settings: its job must refuse to resume it (a different config)
    assert _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "--lr", "0.01", "-q").exit_code == 0
    r = _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "--seeds", "0,1", "--launcher", "local",
               "--wait")
    assert r.exit_code == 2 and "1 of 2 jobs failed" in r.output and "differs in lr" in r.output, r.output
    s = invoke("status", runs)
    lines = {line.split()[0]: line for line in s.output.splitlines() if line.startswith("synthetic/")}
    assert "finished" in lines["synthetic/vanilla/seed-1"]
    assert " failed " in lines["synthetic/vanilla/seed-0"] and "differs in lr" in lines["synthetic/vanilla/seed-0"]
    # the user removes the old run and resubmits: the job id history is kept
    import shutil
    shutil.rmtree(runs / "synthetic/vanilla/seed-0")
    first = run_files.read_jobs(runs)["synthetic/vanilla/seed-0"]["job_id"]
    r = _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "--seeds", "0", "--launcher", "local",
               "--wait", "--resume")
    assert r.exit_code == 0, r.output
    entry = run_files.read_jobs(runs)["synthetic/vanilla/seed-0"]
    assert entry["previous_jobs"] == [first] and entry["job_id"] != first
    assert "2 finished, 0 running, 0 failed, 0 missing" in invoke("status", runs).output


def test_status_tells_running_stopped_and_missing_runs(tiny_cache, short_protocol, tmp_path):
    runs = tmp_path / "runs"
    assert _train(tiny_cache, short_protocol, runs, "--strategy", "vanilla", "--seeds", "0,1", "-q").exit_code == 0
    # seed 1 was stopped after its first step (killed): no results.csv, no lock held
    for i in (2, 3):
        import shutil
        shutil.rmtree(runs / "synthetic/vanilla/seed-1" / f"step-{i:02d}")
    (runs / "synthetic/vanilla/seed-1/results.csv").unlink()
    # seed 0 is being written by someone (its folder's lock is held)
    (runs / "synthetic/vanilla/seed-0/results.csv").unlink()
    run_files.write_jobs(runs, {"synthetic/dns/seed-0": {"job_id": "77_0", "launcher": "slurm"}})
    locks.acquire(runs / "synthetic/vanilla/seed-0", "run folder")
    try:
        s = invoke("status", runs)
    finally:
        locks.release(runs / "synthetic/vanilla/seed-0")
    lines = {line.split()[0]: line for line in s.output.splitlines() if line.startswith("synthetic/")}
    assert " running " in lines["synthetic/vanilla/seed-0"] and "3/3" in lines["synthetic/vanilla/seed-0"]
    assert " failed " in lines["synthetic/vanilla/seed-1"] and "1/3" in lines["synthetic/vanilla/seed-1"]
    assert "--resume" in lines["synthetic/vanilla/seed-1"]
    assert " missing " in lines["synthetic/dns/seed-0"] and "job 77_0" in lines["synthetic/dns/seed-0"]
    assert "0 finished, 1 running, 1 failed, 1 missing" in s.output


def test_launcher_options_are_checked_before_submitting(tiny_cache, short_protocol, tmp_path):
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--launcher", "local", "--overwrite")
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--launcher", "local", "-p", "lambda_min=-1")
    assert r.exit_code == 2 and "lambda_min" in r.output
    assert not (tmp_path / "runs").exists()
    assert invoke("status", tmp_path / "nope").exit_code == 2
