"""The extraction engine's files: committed parts, the resume log and the failures manifest.

While a split is extracted, ``<shard>.h5.parts/`` holds ``run.json`` (what the run embeds and how:
records, encoder, batching; a resumed run must match it) and numbered ``part-NNNNNNNNN.npz`` files,
each committed through a temporary name, fsync and :func:`os.replace`. The failures manifest
``<stem>.failures.csv`` beside the shard lists the inputs left out (id, modality, path, error).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmcl.errors import ExtractError

RUN_FORMAT = 1
FAILURE_FIELDS = ("id", "modality", "path", "error")


@dataclass(frozen=True)
class Failure:
    """One bad input: the record was left out of the shard."""

    id: str
    modality: str
    path: str
    error: str


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def failures_path(path: Path) -> Path:
    """The failures manifest beside a shard: ``<stem>.failures.csv``."""
    return path.with_name(path.stem + ".failures.csv")


def write_part(folder: Path, start: int, end: int, block: dict) -> None:
    tmp = folder / f"part-{start:09d}.tmp.npz"
    arrays = {"start": np.int64(start), "end": np.int64(end),
              "ids": np.asarray(block["ids"], dtype=str), "labels": np.asarray(block["labels"], dtype=np.int64),
              "failures": np.asarray([json.dumps(f.__dict__) for f in block["failures"]], dtype=str)}
    if block["text"] is not None:
        arrays["text"] = np.asarray(block["text"], dtype=str)
    for m, rows in block["emb"].items():
        arrays[f"emb/{m}"] = np.concatenate(rows) if rows else np.zeros((0, block["dim"]), np.float32)
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / f"part-{start:09d}.npz")


def read_part(path: Path, modalities: Sequence[str]) -> dict:
    with np.load(path, allow_pickle=False) as z:
        part = {"start": int(z["start"]), "end": int(z["end"]), "ids": [str(x) for x in z["ids"]],
                "labels": z["labels"], "text": [str(x) for x in z["text"]] if "text" in z else None,
                "failures": [Failure(**json.loads(str(s))) for s in z["failures"]],
                "emb": {m: z[f"emb/{m}"] for m in modalities}}
    return part


def committed(folder: Path) -> list[Path]:
    """Committed parts in order, checked to be contiguous from record 0."""
    parts = sorted(p for p in folder.glob("part-*.npz") if not p.name.endswith(".tmp.npz"))
    expect = 0
    for p in parts:
        with np.load(p, allow_pickle=False) as z:
            start, end = int(z["start"]), int(z["end"])
        if start != expect:
            raise ExtractError(f"{folder}: parts are not contiguous ({p.name} starts at {start}, expected "
                               f"{expect}); delete the folder or pass --overwrite")
        expect = end
    return parts


def part_end(path: Path) -> int:
    with np.load(path, allow_pickle=False) as z:
        return int(z["end"])


def write_failures(path: Path, failures: Sequence[Failure]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(FAILURE_FIELDS)
        for f in failures:
            w.writerow([f.id, f.modality, f.path, f.error])
    os.replace(tmp, path)


def read_failures(path: str | os.PathLike) -> list[Failure]:
    """Read a failures manifest written by the engine."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [Failure(**row) for row in csv.DictReader(fh)]


def check_identity(run_file: Path, identity: Mapping[str, Any]) -> str:
    """Refuse to resume a run made with other records or settings; returns its start time."""
    try:
        before = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExtractError(f"{run_file}: unreadable ({exc}); pass --overwrite to start afresh") from None
    created = before.pop("created_utc", "")
    diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
    if diff:
        raise ExtractError(f"{run_file.parent} belongs to a run with different {diff} "
                           f"(was {[before.get(k) for k in diff]}, now {[identity.get(k) for k in diff]}); "
                           f"pass --overwrite to start afresh")
    return created
