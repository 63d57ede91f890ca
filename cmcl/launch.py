"""Beyond one machine: a sweep's runs as cluster jobs (SLURM through ``submitit``), and their status.

``cmcl train ... --launcher slurm`` validates the sweep as usual, then submits one job per run as a
job array (extra ``[slurm]``: ``pip install 'cmcl[slurm]'``). ``--launcher local`` submits the same
jobs to submitit's local executor (subprocesses of this machine): the same code path, for trying a
sweep before a cluster and for the tests. Job ids go into the runs folder (``RUNS/.jobs/``, through
:mod:`cmcl.data.runs`); each job records when it started and whether it failed; ``cmcl status
RUNS`` combines that with the run folders: finished, running, failed or missing.

A job trains its run with ``resume`` (a resubmitted job continues a run that was killed or timed
out), and its torch threads are the CPUs SLURM gave it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmcl.data import locks
from cmcl.data import runs as run_files
from cmcl.errors import CMCLError, ConfigError

log = logging.getLogger("cmcl")

LAUNCHERS = ("slurm", "local")


@dataclass(frozen=True)
class ClusterOptions:
    """Resources of each job (SLURM names them; the local executor uses ``timeout_min``, ``gpus``, ``cpus``)."""

    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int = 1
    mem_gb: float | None = None
    array_parallelism: int = 256
    account: str | None = None


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher needs the submitit package: pip install 'cmcl[slurm]'") from None
    return submitit


def run_job(cfg: Any, runs: str, key: str, options: dict[str, Any]) -> dict[str, float]:
    """What one job runs (on the cluster node): train the run, recording its start and any failure."""
    import torch

    from cmcl.pipeline import train_config

    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", ""))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{job}_{task}" if job and task else job or os.environ.get("SUBMITIT_LOCAL_JOB_ID", "")
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", options.pop("cpus", 1) or 1))
    torch.set_num_threads(max(1, cpus))
    run_files.write_job_state(Path(runs), key, {"state": "started", "job_id": job_id, "time": time.time(),
                                                "host": os.uname().nodename})
    try:
        _, summary = train_config(cfg, runs=Path(runs), **options)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, (CMCLError, OSError)) else f"{type(exc).__name__}: {exc}"
        run_files.write_job_state(Path(runs), key, {"state": "failed", "job_id": job_id, "time": time.time(),
                                                    "error": message})
        raise
    run_files.write_job_state(Path(runs), key, {"state": "finished", "job_id": job_id, "time": time.time()})
    return summary


def submit(cfgs: Sequence[Any], runs: Path, *, launcher: str, cluster: ClusterOptions, options: dict[str, Any],
           wait: bool = False) -> list[str]:
    """Submit one job per configuration (a job array); returns the job ids.

    ``options`` go to :func:`cmcl.pipeline.train_config` (``resume`` is forced on: a resubmission
    continues). With ``wait``, block until every job ended and raise for failures.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    submitit = _submitit()
    logs = Path(runs) / ".jobs" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=str(logs / "%j"), cluster="slurm" if launcher == "slurm" else "local")
    params: dict[str, Any] = {"timeout_min": cluster.time_min, "cpus_per_task": cluster.cpus,
                              "slurm_array_parallelism": cluster.array_parallelism, "name": "cmcl"}
    if cluster.gpus:
        params["gpus_per_node"] = cluster.gpus
    if launcher == "slurm":
        if cluster.partition:
            params["slurm_partition"] = cluster.partition
        if cluster.mem_gb:
            params["mem_gb"] = cluster.mem_gb
        if cluster.account:
            params["slurm_account"] = cluster.account
    executor.update_parameters(**params)
    keys = [run_files.run_key(runs, c.backbone, c.label or c.strategy, c.seed) for c in cfgs]
    job_options = {**options, "resume": True, "overwrite": False, "cpus": cluster.cpus}
    jobs = executor.map_array(run_job, list(cfgs), [str(runs)] * len(cfgs), keys, [dict(job_options) for _ in cfgs])
    entries = {key: {"job_id": str(job.job_id), "launcher": launcher, "submitted": time.time(),
                     "log": str(logs / str(job.job_id))} for key, job in zip(keys, jobs)}
    run_files.write_jobs(runs, entries)
    for key, job in zip(keys, jobs):
        log.info("submitted %s: job %s", key, job.job_id)
    if wait:
        failed = []
        for key, job in zip(keys, jobs):
            try:
                job.result()
            except Exception as exc:  # noqa: BLE001 (reported below, with the job's own error)
                state = run_files.read_job_states(runs).get(key, {})
                failed.append(f"{key} (job {job.job_id}): {state.get('error') or str(exc).strip().splitlines()[-1]}")
        if failed:
            raise CMCLError(f"{len(failed)} of {len(jobs)} jobs failed (resubmit with --resume): " + "; ".join(failed))
    return [str(j.job_id) for j in jobs]


@dataclass
class RunStatus:
    """One row of ``cmcl status``."""

    key: str
    state: str          # finished, running, failed, missing
    steps: str          # finished steps / total
    job: str
    detail: str


def status(runs: Path) -> list[RunStatus]:
    """The state of every run the runs folder knows of (run folders and submitted jobs).

    ``finished``: ``results.csv`` is there (and no later job failed on it). ``running``: a process holds the run folder's lock.
    ``failed``: the job recorded an error, or the run started and stopped without finishing (killed,
    timed out, interrupted); ``--resume`` continues it. ``missing``: submitted, but no run folder yet
    (queued, or the job never started).
    """
    runs = Path(runs)
    if not runs.is_dir():
        raise ConfigError(f"{runs}: no such runs folder")
    jobs = run_files.read_jobs(runs)
    states = run_files.read_job_states(runs)
    folders = {str(p.relative_to(runs)): p for p in run_files.find_runs(runs)}
    out = []
    for key in sorted(set(jobs) | set(folders)):
        run = runs / key
        job = jobs.get(key, {}).get("job_id", "-")
        st = states.get(key, {})
        done = run_files.finished_steps(run)
        total = len(run_files.read_json(run / "config.json")["protocol"]["steps"]) if key in folders else None
        steps = f"{(done or [0])[-1]}/{total}" if total else "-"
        results = run / "results.csv"
        failed_since = st.get("state") == "failed" and (not results.is_file()
                                                        or st.get("time", 0) >= results.stat().st_mtime)
        if results.is_file() and not failed_since:
            out.append(RunStatus(key, "finished", steps, job, ""))
        elif key in folders and locks.is_locked(run):
            out.append(RunStatus(key, "running", steps, job, st.get("host", "")))
        elif st.get("state") == "failed":
            out.append(RunStatus(key, "failed", steps, job, st.get("error", "")))
        elif key in folders:
            out.append(RunStatus(key, "failed", steps, job, "stopped before finishing (killed, timed out or "
                                 "interrupted); continue with --resume"))
        else:
            out.append(RunStatus(key, "missing", steps, job, "no run folder yet (queued, or the job never started)"))
    return out


def format_status(rows: list[RunStatus]) -> str:
    """``cmcl status`` as text: one line per run, then the counts."""
    if not rows:
        return "no runs"
    width = max(len(r.key) for r in rows)
    lines = [f"{r.key:<{width}}  {r.state:<8}  {r.steps:>6}  job {r.job}" + (f"  {r.detail}" if r.detail else "")
             for r in rows]
    counts = {s: sum(r.state == s for r in rows) for s in ("finished", "running", "failed", "missing")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
