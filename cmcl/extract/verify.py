"""``cmcl extract --verify``: re-check a feature cache against the extraction runs that made it.

For every split found (and every split expected but absent) :func:`verify` checks the shard files
(schema, shapes, finiteness, unit norms, unique ids, complete shard sets), that each shard's rows
plus its failures manifest account for the records it was assigned, that no run was left
unfinished, and, given the data, that the ids are exactly those the reader lists now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from cmcl.data.features import FeatureShard, list_cache, parse_shard_name, split_files
from cmcl.data.readers import READERS, DatasetReader, get_reader
from cmcl.errors import CMCLError
from cmcl.extract.engine import failures_path, read_failures


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: the splits that passed and every problem found."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def format(self) -> str:
        """One line per split and per problem, then a count."""
        lines = [f"ok       {c}" for c in self.checked] + [f"PROBLEM  {p}" for p in self.problems]
        lines.append(f"{len(self.checked)} split(s) ok, {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _examples(items: Iterable[str], k: int = 3) -> str:
    items = sorted(items)
    return ", ".join(repr(i) for i in items[:k]) + (", ..." if len(items) > k else "")


def verify(features_root: str | os.PathLike, *, backbone: str | None = None,
           datasets: Iterable[str] | None = None, splits: Iterable[str] = ("train", "test"),
           data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
           reader_options: Mapping[str, Mapping[str, Any]] | None = None) -> VerifyReport:
    """Check every split under ``features_root``; never raises on a bad cache, reports instead.

    Args:
        features_root: the cache root given to ``cmcl extract --out``.
        backbone: only this backbone (default: every backbone found).
        datasets: datasets expected for each backbone (default: all seven); absent splits are reported.
        splits: splits expected per dataset.
        data_root: when given, ids are compared with the readers' records.
        cache_dir: the readers' cache dir (default ``<features_root>/.media``).
        reader_options: dataset -> reader options (e.g. ``{"vggsound_s": {"manifest": ...}}``).
    """
    root = Path(features_root)
    report = VerifyReport()
    if not root.is_dir():
        report.problems.append(f"{root}: no such feature cache folder")
        return report
    wanted = list(datasets) if datasets is not None else list(READERS)
    entries = [e for e in list_cache(root) if (backbone is None or e.backbone == backbone) and e.dataset in wanted]
    backbones = sorted({e.backbone for e in entries} | ({backbone} if backbone else set()))
    found = {(e.backbone, e.dataset, e.split) for e in entries}
    for b in backbones:
        for d in wanted:
            for s in splits:
                if (b, d, s) not in found:
                    report.problems.append(f"{b}/{d}/{s}: missing (no {s}.h5 or shards in {root / b / d}); "
                                           f"run `cmcl extract --backbone {b} --dataset {d} --split {s}`")
    for b in backbones:
        for d in wanted:
            for unfinished in sorted((root / b / d).glob("*.parts")) + sorted((root / b / d).glob("*.partial")):
                report.problems.append(f"{unfinished}: unfinished extraction; run the same `cmcl extract` again "
                                       f"to resume it (or --overwrite)")
    readers: dict[str, DatasetReader | str] = {}
    for b, d, s in sorted(found):
        problem = _check_split(root, b, d, s, data_root, cache_dir, reader_options or {}, readers)
        if problem:
            report.problems.append(f"{b}/{d}/{s}: {problem}")
        else:
            report.checked.append(_summary(root, b, d, s))
    return report


def _summary(root: Path, b: str, d: str, s: str) -> str:
    files = split_files(root, b, d, s)
    rows = fails = 0
    for f in files:
        with FeatureShard(f) as sh:
            rows += len(sh)
        fp = failures_path(f)
        fails += len(read_failures(fp)) if fp.exists() else 0
    return f"{b}/{d}/{s}: {rows} rows in {len(files)} file(s), {fails} failed input(s) listed"


def _reader(d: str, data_root, cache_dir, options, readers) -> DatasetReader | str:
    if d not in readers:
        try:
            readers[d] = get_reader(d, data_root, cache_dir=cache_dir, **dict(options.get(d, {})))
        except CMCLError as exc:
            readers[d] = f"cannot read the dataset to compare ids: {exc}"
    return readers[d]


def _check_split(root: Path, b: str, d: str, s: str, data_root, cache_dir, options, readers) -> str:
    try:
        files = split_files(root, b, d, s)
    except CMCLError as exc:
        return str(exc)
    stored: list[str] = []
    failed: set[str] = set()
    limits = set()
    for f in files:
        try:
            with FeatureShard(f) as sh:
                sh.check()
                ids = sh.ids.tolist()
                extra = sh.meta.extra
        except CMCLError as exc:
            return str(exc)
        fp = failures_path(f)
        fails = read_failures(fp) if fp.exists() else []
        failed |= {x.id for x in fails}
        expected = extra.get("expected_records")
        if expected is not None:
            n_failed = len({x.id for x in fails})
            if len(ids) + n_failed != int(expected):
                why = "" if fp.exists() else f" and its failures manifest {fp.name} is missing"
                return (f"{f.name} holds {len(ids)} rows + {n_failed} failures = {len(ids) + n_failed}, "
                        f"but {int(expected)} records were assigned to it{why}")
        parsed = parse_shard_name(f.name)
        if parsed and "num_shards" in extra and (int(extra["shard"]), int(extra["num_shards"])) != parsed[1:]:
            return f"{f.name} says it is shard {int(extra['shard'])} of {int(extra['num_shards'])}"
        limits.add(int(extra.get("limit", -1)))
        stored += ids
    if len(set(stored)) != len(stored):
        return f"ids repeat across shards ({len(stored) - len(set(stored))} duplicates)"
    if data_root is None:
        return ""
    reader = _reader(d, data_root, cache_dir or root / ".media", options, readers)
    if isinstance(reader, str):
        return reader
    if len(limits) != 1:
        return f"shards were made with different --limit values {sorted(limits)}"
    limit = limits.pop()
    try:
        records = reader.records(s)
    except CMCLError as exc:
        return f"cannot list the reader's records: {exc}"
    expected_ids = {r.id for r in (records if limit < 0 else records[:limit])}
    have = set(stored)
    missing = expected_ids - have - failed
    extra_ids = have - expected_ids
    if missing:
        return (f"{len(missing)} of the reader's {len(expected_ids)} ids are neither stored nor listed "
                f"as failed: {_examples(missing)}")
    if extra_ids:
        return f"{len(extra_ids)} stored ids are not in the reader's records: {_examples(extra_ids)}"
    return ""
