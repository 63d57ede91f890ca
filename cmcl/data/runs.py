"""The run-folder format: run directories and per-step checkpoints.

Like the feature cache (:mod:`cmcl.data.features`), a run folder is a file format every stage
reads: ``train`` writes it, ``evaluate`` aggregates it, ``info`` describes it, the Python API opens
it. This module is its one reader and writer; it knows files, not models (learners are any
``torch.nn.Module`` whose state dict it saves).

A run lives at ``<runs>/<backbone>/<label>/seed-<seed>/``::

    config.json           resolved TrainConfig + cmcl version, git sha, protocol, feature files
    step-00/eval.csv      evaluation before any training
    step-01/              one folder per finished step, renamed into place atomically
        learners.safetensors   every learner's weight and bias
        strategy.pt            the strategy's state (torch.save; loaded with weights_only=True);
                               kept for the last finished step only unless keep_states="all"
        eval.csv               row 1 of the result matrices (long format)
        losses.csv             per-batch loss terms
        metrics.json           step summary: sizes, timings, mean losses, strategy report
    results.csv           all eval rows with run columns, written when the run completes

A step folder exists only once all its files are written (``step-NN.tmp`` is renamed), so the
last ``step-NN`` is always a consistent point to resume from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from cmcl.data.features import FeatureShard, split_files
from cmcl.errors import RunError

_STEP_RE = re.compile(r"^step-(\d{2,})$")
EVAL_COLUMNS = ["trained_through", "eval_step", "dataset", "pair", "direction", "metric", "value"]


def run_dir(runs: str | Path, backbone: str, label: str, seed: int) -> Path:
    """Folder of one run."""
    return Path(runs) / backbone / label / f"seed-{seed}"


def step_dir(run: Path, index: int) -> Path:
    """Folder of one finished step."""
    return run / f"step-{index:02d}"


def finished_steps(run: Path) -> list[int]:
    """Indices of the finished steps (0 = the pre-training evaluation), ascending."""
    if not run.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name)))


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``; on any failure (a full disk, say) no file is left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically."""
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"))


def write_csv(path: Path, frame: pd.DataFrame, **kwargs: Any) -> None:
    """Write a CSV atomically (``kwargs`` go to :meth:`pandas.DataFrame.to_csv`)."""
    _atomic(path, lambda tmp: frame.to_csv(tmp, index=False, **kwargs))


def read_json(path: Path) -> Any:
    """Read JSON, naming the file on failure."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None


def write_step(run: Path, index: int, *, learners: torch.nn.Module | None, strategy_state: dict | None,
               eval_rows: list[dict], losses: pd.DataFrame | None = None, metrics: dict | None = None) -> Path:
    """Write a finished step's folder atomically (files into ``step-NN.tmp``, then rename)."""
    final = step_dir(run, index)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        if learners is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in learners.state_dict().items()}
            save_file(state, str(tmp / "learners.safetensors"))
        if strategy_state is not None:
            torch.save(strategy_state, tmp / "strategy.pt")
        pd.DataFrame(eval_rows, columns=EVAL_COLUMNS).to_csv(tmp / "eval.csv", index=False)
        if losses is not None:
            losses.to_csv(tmp / "losses.csv", index=False)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # a full disk, say: no half-written step is left, the previous steps stay usable
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_learners(path: Path, learners: torch.nn.Module, *, absent_ok: Iterable[str] = ()) -> None:
    """Load ``learners.safetensors`` into ``learners`` (strict).

    ``absent_ok`` names modalities the file may lack (a run whose protocol was extended with a new
    modality: its earlier steps have no learner for it, which stays as created, the identity).
    """
    try:
        state = load_file(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise RunError(f"{path}: cannot read learners ({exc})") from None
    device = next(learners.parameters()).device
    missing, unexpected = learners.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    absent = set(absent_ok)
    missing = [k for k in missing if not (k.startswith("layers.") and k.split(".")[1] in absent)]
    if missing or unexpected:
        raise RunError(f"{path}: learner keys do not match (missing {missing}, unexpected {unexpected})")


def load_strategy_state(path: Path) -> dict:
    """Load a strategy state saved by :func:`write_step` (safe: ``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: missing (the strategy state of the last finished step is needed to resume)") from None
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise RunError(f"{path}: cannot load strategy state ({type(exc).__name__}: {exc})") from None


def _read_csv(path: Path) -> pd.DataFrame:
    """A run file as a frame, naming the file on failure."""
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RunError(f"{path}: cannot read ({exc})") from None


def read_eval(run: Path) -> pd.DataFrame:
    """Every finished step's eval rows of a run, in step order."""
    frames = [read_eval_step(run, i) for i in finished_steps(run)]
    if not frames:
        return pd.DataFrame(columns=EVAL_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def feature_fingerprint(root: str | Path, backbone: str, datasets: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Which feature files a run reads: name, creation stamp, rows, size and modification time.

    The size and modification time catch a file edited in place; a copied cache keeps its
    fingerprint when the copy keeps modification times (``cp -a``, ``rsync -a``).
    """
    out = {}
    for dataset in datasets:
        for split in ("train", "test"):
            stamps = []
            for f in split_files(root, backbone, dataset, split):
                with FeatureShard(f) as shard:
                    st = f.stat()
                    stamps.append(f"{f.name}@{shard.meta.created_utc}:{len(shard)}:{st.st_size}:{st.st_mtime_ns}")
            out[f"{dataset}/{split}"] = stamps
    return out


#: Configuration fields that may change when ``--resume`` extends a run's protocol.
PROTOCOL_FIELDS = ("protocol", "protocol_sha256")


def _protocol_steps(header: dict) -> list[tuple[str, tuple[str, ...] | None]]:
    """A header's protocol as ``(step key, metric kinds or None when not recorded)`` per step."""
    proto = header.get("protocol") or {}
    keys = list(proto.get("steps") or [])
    metrics = proto.get("metrics")
    if not isinstance(metrics, list) or len(metrics) != len(keys):
        metrics = [None] * len(keys)
    return [(k, tuple(m) if m is not None else None) for k, m in zip(keys, metrics)]


def protocol_extension(old: dict, new: dict) -> int | None:
    """How many steps ``new``'s protocol adds to ``old``'s, or ``None`` if it is not an extension.

    An extension keeps every stored step (dataset, ordered pair and, when recorded, metric kinds)
    in order and may append steps; 0 means the same steps (possibly from another file).
    """
    before, now = _protocol_steps(old), _protocol_steps(new)
    if len(now) < len(before):
        return None
    for i, ((k0, m0), (k1, m1)) in enumerate(zip(before, now), start=1):
        if k0 != k1 or (m0 is not None and m1 is not None and m0 != m1):
            return None
    return len(now) - len(before)


def _first_change(old: dict, new: dict) -> str:
    before, now = _protocol_steps(old), _protocol_steps(new)
    for i, ((k0, m0), (k1, m1)) in enumerate(zip(before, now), start=1):
        if k0 != k1:
            return f"step {i} was {k0}, now {k1}"
        if m0 is not None and m1 is not None and m0 != m1:
            return f"step {i} ({k0}) scored {list(m0)}, now {list(m1)}"
    return f"the run has {len(before)} steps, the new protocol only {len(now)}"


def prepare_run_folder(run: Path, header: dict, *, resume: bool, overwrite: bool) -> None:
    """Make ``run`` ready to train into; refuse whatever would lose or mix up work.

    ``header`` is the ``config.json`` to write: its ``config`` (all fields but ``device`` must match
    on ``--resume``) and ``features`` (the fingerprint; must match too). A folder that never
    finished a step (a failed start) is started afresh; one with finished steps needs ``resume``
    (or ``overwrite``, which deletes it first). The caller holds the folder's lock.

    A run grows: under ``resume`` the protocol may be another one whose steps *extend* the stored
    ones (same steps in the same order, at least one new one appended). Then only the protocol fields of the
    configuration may differ, the stored datasets' feature files must be unchanged (new datasets
    are added to the fingerprint), and ``config.json`` is replaced atomically by ``header`` with
    the previous protocol appended to its ``history``. Any other protocol change is refused.
    """
    config_path = run / "config.json"
    if run.exists() and overwrite:
        shutil.rmtree(run)
    if config_path.exists():
        if not [i for i in finished_steps(run) if i >= 1]:
            shutil.rmtree(run)  # nothing trained yet: a plain retry restarts it
        elif not resume:
            raise RunError(f"{run} already exists; pass --resume to continue it or --overwrite to start over")
        else:
            old = read_json(config_path)
            old_cfg, new_cfg = dict(old.get("config", {})), dict(header["config"])
            old_cfg.pop("device", None)
            new_cfg.pop("device", None)
            diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
            added = protocol_extension(old, header)
            if diff and set(diff) <= set(PROTOCOL_FIELDS) and added != 0:
                if added is None:
                    raise RunError(f"{run}: --resume with protocol {new_cfg.get('protocol')} that does not extend "
                                   f"the run's {old_cfg.get('protocol')} ({_first_change(old, header)}); "
                                   f"only appending steps is allowed")
            elif diff:
                raise RunError(f"{run}: --resume with a different configuration (differs in {', '.join(diff)}); "
                               f"use another --runs folder or --overwrite")
            before, now = old.get("features") or {}, header["features"]
            changed = sorted(k for k in before if before.get(k) != now.get(k))
            if not diff:  # same protocol: the same files, no more
                changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                raise RunError(f"{run}: --resume but the feature files changed since the run started "
                               f"({', '.join(changed)} under {new_cfg.get('features')}/{new_cfg.get('backbone')})")
            if diff or old.get("protocol") != header.get("protocol"):
                done = [i for i in finished_steps(run) if i >= 1]
                history = list(old.get("history") or [])
                history.append({"protocol": old.get("protocol"), "config_protocol": old_cfg.get("protocol"),
                                "finished_steps": done[-1] if done else 0,
                                "cmcl_version": old.get("cmcl_version"), "git_sha": old.get("git_sha")})
                write_json(config_path, {**header, "history": history})
    elif run.exists() and any(run.iterdir()):
        raise RunError(f"{run} exists but has no config.json; remove it or pass --overwrite")
    run.mkdir(parents=True, exist_ok=True)
    for tmp in run.glob("*.tmp"):  # leftovers of a step that was killed while being written
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if not config_path.exists():
        write_json(config_path, header)


def write_results(run: Path) -> pd.DataFrame:
    """``results.csv``: every finished step's eval rows with the run's columns (marks the run complete)."""
    cfg = read_json(run / "config.json")["config"]
    frame = read_eval(run)
    frame.insert(0, "seed", cfg["seed"])
    frame.insert(0, "strategy", cfg.get("label") or cfg["strategy"])
    frame.insert(0, "backbone", cfg["backbone"])
    frame.insert(0, "run", str(run))
    write_csv(run / "results.csv", frame)
    return frame


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory (a folder holding ``config.json``) under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such runs folder")
    return sorted(p.parent for p in root.rglob("config.json"))


def describe_run(run: Path) -> str:
    """What ``cmcl info RUN`` prints: label, seed, data, progress, parameters, summary."""
    header = read_json(run / "config.json")
    cfg = header["config"]
    steps = header["protocol"]["steps"]
    done = finished_steps(run)
    lines = [f"{run}",
             f"  {cfg['label'] or cfg['strategy']} seed {cfg['seed']} on {cfg['backbone']} ({cfg['features']}), "
             f"protocol {cfg['protocol']}: {done[-1] if done else 0}/{len(steps)} steps finished",
             f"  params {json.dumps(cfg['params'])}  harness {cfg['harness']}  cmcl {header['cmcl_version']} "
             f"git {header['git_sha'][:10] or '-'}"]
    if (run / "summary.json").is_file():
        lines.append("  " + "  ".join(f"{k} {v:.2f}" for k, v in read_json(run / "summary.json").items()))
    return "\n".join(lines)


def read_losses(run: Path) -> pd.DataFrame:
    """Every trained step's per-update records (``losses.csv``) of a run, with a ``step`` column, in order."""
    frames = []
    for i in finished_steps(run):
        path = step_dir(run, i) / "losses.csv"
        if i == 0 or not path.is_file():
            continue
        frames.append(_read_csv(path).assign(step=i))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "epoch", "update"])


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """Every trained step's ``metrics.json`` of a run, in step order."""
    return [read_json(step_dir(run, i) / "metrics.json") for i in finished_steps(run)
            if i > 0 and (step_dir(run, i) / "metrics.json").is_file()]


def read_eval_step(run: Path, index: int) -> pd.DataFrame:
    """One finished step's eval rows."""
    return _read_csv(step_dir(run, index) / "eval.csv")


def read_step_losses(run: Path, index: int) -> pd.DataFrame:
    """One trained step's per-update records (``losses.csv``)."""
    return _read_csv(step_dir(run, index) / "losses.csv")


# ---------------------------------------------------------------------------------- cluster jobs
# RUNS/.jobs/jobs.json maps each submitted run ("<backbone>/<label>/seed-<seed>") to its job id;
# RUNS/.jobs/state/<key with / as __>.json is what the job itself recorded (started, failed, finished).

def run_key(runs: str | Path, backbone: str, label: str, seed: int) -> str:
    """A run's path relative to the runs root (the key of the job files)."""
    return str(run_dir(runs, backbone, label, seed).relative_to(Path(runs)))


def _jobs_dir(runs: str | Path) -> Path:
    return Path(runs) / ".jobs"


def read_jobs(runs: str | Path) -> dict[str, dict[str, Any]]:
    """Every run submitted as a job under ``runs``: key -> job id, launcher, submission time, log folder."""
    path = _jobs_dir(runs) / "jobs.json"
    return read_json(path) if path.is_file() else {}


def write_jobs(runs: str | Path, entries: dict[str, dict[str, Any]]) -> None:
    """Record submitted jobs (a resubmission replaces a run's entry; its previous job ids are kept)."""
    path = _jobs_dir(runs) / "jobs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _job_lock(runs):
        jobs = read_jobs(runs)
        for key, entry in entries.items():
            previous = jobs.get(key, {})
            history = previous.get("previous_jobs", []) + ([previous["job_id"]] if "job_id" in previous else [])
            jobs[key] = {**entry, "previous_jobs": history}
        write_json(path, jobs)


def _job_lock(runs: str | Path):
    from filelock import FileLock

    return FileLock(str(_jobs_dir(runs) / ".jobs.lock"), timeout=60)


def write_job_state(runs: str | Path, key: str, state: dict[str, Any]) -> None:
    """What a job records about its run (atomically)."""
    path = _jobs_dir(runs) / "state" / (key.replace("/", "__") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, **state})


def read_job_states(runs: str | Path) -> dict[str, dict[str, Any]]:
    """Every job state recorded under ``runs``: key -> state."""
    folder = _jobs_dir(runs) / "state"
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.glob("*.json")):
        state = read_json(path)
        out[state["key"]] = state
    return out
