"""The extraction engine: (encoder, dataset, split) -> feature-cache shard, resumable and shardable.

How a run works (:func:`extract_split`):

1. The reader lists the split's records (sorted by id); ``limit`` keeps the first N; with
   ``num_shards`` > 1 this run takes the contiguous block ``shard`` of them, so the shards
   concatenated in order hold the split in id order.
2. Records are cut into fixed batches and preprocessed by a pool of worker processes (torch
   ``DataLoader``); the encoder embeds each modality of a batch on its device.
3. Every ``commit_every`` records the rows are *committed*: written to a numbered part file in
   ``<shard>.h5.parts/`` through a temporary name and :func:`os.replace`. A run killed at any
   moment loses at most the uncommitted block; started again, it checks that it sees the same
   records, encoder and batching (``run.json``), and goes on after the last part. Batches never
   straddle a commit, so a resumed run embeds exactly the batches an uninterrupted run would.
4. At the end the parts are copied into the shard with :class:`~cmcl.data.features.FeatureWriter`
   (itself atomic), class prototypes are added for accuracy datasets, the failures manifest
   ``<shard stem>.failures.csv`` is written, and the parts are deleted.

Bad media (missing, truncated, undecodable, or embedded to non-finite values) are left out of
the shard and listed in the failures manifest with id, modality, path and error. The run raises
:class:`~cmcl.errors.ExtractError` as soon as more than ``max_failures`` records failed; the
committed work is kept, so rerunning with a higher threshold resumes.

Ranks: under ``torchrun`` the shard and shard count come from ``RANK``/``WORLD_SIZE``
(:func:`shard_from_env`); every rank writes its own shard file and none waits on another.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cmcl import __version__
from cmcl.data import locks
from cmcl.data.features import FeatureShard, FeatureWriter, ShardMeta, parse_shard_name, shard_path
from cmcl.data.readers import DatasetReader, Record, fingerprint, get_reader
from cmcl.errors import CacheError, ExtractError
from cmcl.extract import parts
from cmcl.extract.encoders.base import Encoder
from cmcl.extract.parts import Failure, failures_path, read_failures

log = logging.getLogger(__name__)

_MISSING = "missing file"


# ------------------------------------------------------------------------------------ results
__all__ = ["ExtractResult", "Failure", "describe", "extract", "extract_split", "failures_path", "local_device",
           "read_failures", "resolve_shard", "shard_bounds", "shard_from_env"]


@dataclass
class ExtractResult:
    """What one (dataset, split, shard) run did.

    Attributes:
        path: the shard file.
        rows: rows in the shard.
        expected: records assigned to this shard (``rows + len(failures)`` when complete).
        failures: inputs left out.
        failures_path: the failures manifest beside the shard.
        status: ``"written"``, ``"resumed"`` (finished a run that had committed parts) or
            ``"exists"`` (an identical shard was already there; nothing done).
        resumed_at: records already committed when the run started.
    """

    dataset: str
    split: str
    path: Path
    rows: int
    expected: int
    failures: list[Failure]
    failures_path: Path
    status: str
    resumed_at: int = 0


def describe(result: ExtractResult) -> str:
    """One line for the CLI: what was written where, and how many inputs failed."""
    what = {"written": "wrote", "resumed": f"resumed at record {result.resumed_at} and wrote",
            "exists": "kept the existing"}[result.status]
    line = f"{result.dataset}/{result.split}: {what} {result.rows} rows in {result.path}"
    if result.failures:
        line += f"; {len({f.id for f in result.failures})} input(s) failed, listed in {result.failures_path}"
    return line


# ------------------------------------------------------------------------------------ ranks
def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(shard, num_shards)`` from torchrun's ``RANK``/``WORLD_SIZE``; ``(0, 1)`` outside torchrun."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        raise ExtractError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                           f"are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ExtractError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def local_device(environ: Mapping[str, str] | None = None) -> str:
    """The device this process should use: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    env = os.environ if environ is None else environ
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(env.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def resolve_shard(shard: int | None, num_shards: int | None,
                  environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Explicit ``--shard/--num-shards`` win; otherwise torchrun's rank; otherwise one shard."""
    if num_shards is None and shard is None:
        return shard_from_env(environ)
    if num_shards is None or shard is None:
        raise ExtractError("give both --shard and --num-shards, or neither")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ExtractError(f"--shard {shard} is not in [0, --num-shards {num_shards})")
    return shard, num_shards


def shard_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous block ``[lo, hi)`` of ``n`` records taken by ``shard`` (sizes differ by at most one)."""
    return n * shard // num_shards, n * (shard + 1) // num_shards


# ------------------------------------------------------------------------------------ workers
class _Items(Dataset):
    """Preprocess one record per index; failures are returned, not raised (they are data here)."""

    def __init__(self, records: Sequence[Record], preps: Mapping[str, Callable[[Any], torch.Tensor]]) -> None:
        self.records = records
        self.preps = dict(preps)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        out, fails = {}, []
        for m, prep in self.preps.items():
            item = rec.data.get(m)
            if item is None:
                fails.append(Failure(rec.id, m, "", f"record has no {m} input"))
                continue
            if m != "text" and not os.path.exists(item):
                fails.append(Failure(rec.id, m, item, _MISSING))
                continue
            try:
                out[m] = prep(item)
            except Exception as exc:  # any decoder error is a bad input, recorded with its message
                fails.append(Failure(rec.id, m, "" if m == "text" else str(item),
                                     f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]))
        return i, out, fails, rec


def _collate(items):
    """Stack the good items of a batch per modality; keep failures aside.

    Preprocessors return one fixed shape per modality; an item whose tensor has another shape than
    most of its batch is a bad input (e.g. a clip too short to sample), recorded as a failure.
    """
    fails = [f for _, _, fs, _ in items for f in fs]
    good = [(i, out, rec) for i, out, fs, rec in items if not fs]
    if good:
        for m in good[0][1]:
            shapes = [tuple(out[m].shape) for _, out, _ in good]
            common = max(set(shapes), key=shapes.count)
            for (i, out, rec), shape in zip(good, shapes):
                if shape != common:
                    fails.append(Failure(rec.id, m, "" if m == "text" else str(rec.data.get(m, "")),
                                         f"preprocessed to shape {shape}, the batch's items to {common}"))
            bad = {f.id for f in fails}
            good = [g for g in good if g[2].id not in bad]
    positions = [i for i, _, _ in good]
    tensors = {m: torch.stack([out[m] for _, out, _ in good]) for m in (good[0][1] if good else ())}
    return positions, tensors, fails


# ------------------------------------------------------------------------------------ engine
def _json_attr(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _check_encoder(encoder: Encoder, modalities: Sequence[str], dataset: str) -> None:
    lacking = [m for m in modalities if m not in encoder.modalities]
    if lacking:
        raise ExtractError(f"backbone {encoder.name!r} cannot embed {lacking} needed by {dataset} "
                           f"(it embeds {list(encoder.modalities)})")


def _embed_classes(encoder: Encoder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    prep = encoder.preprocessor("text")
    out = []
    for lo in range(0, len(texts), batch_size):
        chunk = texts[lo:lo + batch_size]
        out.append(np.asarray(encoder.encode_batch("text", torch.stack([prep(t) for t in chunk])), np.float32))
    return np.concatenate(out)


def extract_split(encoder: Encoder, reader: DatasetReader, split: str, out: str | os.PathLike, *,
                  limit: int | None = None, overwrite: bool = False, max_failures: int = 0,
                  shard: int = 0, num_shards: int = 1, workers: int = 0, batch_size: int = 64,
                  commit_every: int = 1024, progress: bool = True) -> ExtractResult:
    """Extract one split (or one shard of it) into the cache under ``out``.

    Args:
        encoder: the frozen encoder (already on its device).
        reader: the dataset's reader.
        split: ``"train"`` or ``"test"``.
        out: feature-cache root; the shard goes to ``<out>/<encoder>/<dataset>/<split>[...].h5``.
        limit: keep only the first ``limit`` records of the split (smoke runs).
        overwrite: discard an existing shard, failures manifest and unfinished parts first.
        max_failures: records that may fail before the run stops with :class:`ExtractError`.
        shard, num_shards: which contiguous block of the split this run writes.
        workers: preprocessing worker processes (0: in this process).
        batch_size: records per encoder call.
        commit_every: records per committed part (rounded up to a multiple of ``batch_size``).
        progress: show a tqdm bar with items per second.

    Returns:
        An :class:`ExtractResult`.
    """
    from tqdm import tqdm

    dataset = reader.name
    modalities = tuple(reader.modalities)  # the reader declares what its dataset pairs
    _check_encoder(encoder, modalities, dataset)
    if batch_size < 1 or commit_every < 1:
        raise ExtractError("batch_size and commit_every must be positive")
    commit_every = math.ceil(commit_every / batch_size) * batch_size
    path = shard_path(out, encoder.name, dataset, split, *((shard, num_shards) if num_shards > 1 else ()))
    parts_dir = parts.parts_dir(path)
    fails_path = failures_path(path)

    all_records = reader.records(split)
    if limit is not None:
        all_records = all_records[:max(0, int(limit))]
    lo, hi = shard_bounds(len(all_records), shard, num_shards)
    records = all_records[lo:hi]
    fp = fingerprint(records)
    identity = {
        "format": parts.RUN_FORMAT, "dataset": dataset, "split": split, "shard": shard, "num_shards": num_shards,
        "limit": -1 if limit is None else int(limit), "records": len(records), "fingerprint": fp,
        "backbone": encoder.name, "dim": int(encoder.dim), "checkpoint": encoder.checkpoint,
        "encoder_attributes": json.loads(json.dumps(encoder.attributes(), sort_keys=True, default=str)),
        "batch_size": batch_size, "commit_every": commit_every, "modalities": list(modalities),
    }

    # one writer per shard: a second process extracting the same split fails at once
    with locks.exclusive(path, "feature file"):
        if overwrite:
            shutil.rmtree(parts_dir, ignore_errors=True)
            for p in (path, fails_path, path.with_name(path.name + ".partial")):
                p.unlink(missing_ok=True)
            _remove_other_forms(out, encoder.name, dataset, split, path)
        else:
            _check_other_forms(out, encoder.name, dataset, split, path)
            if path.exists():
                if parts_dir.is_dir():  # killed after the shard was moved into place: finish the clean-up
                    parts.check_identity(parts_dir / "run.json", identity)
                    failures = [f for p in parts.committed(parts_dir) for f in parts.read_part(p, ())["failures"]]
                    parts.write_failures(fails_path, failures)
                    shutil.rmtree(parts_dir)
                    res = _existing(path, fails_path, dataset, split, fp, len(records))
                    res.status, res.resumed_at = "resumed", len(records)
                    return res
                return _existing(path, fails_path, dataset, split, fp, len(records))
        if not records:
            raise ExtractError(f"{dataset}/{split}: no records for shard {shard} of {num_shards} "
                               f"({len(all_records)} in the split); use fewer shards")

        parts_dir.mkdir(parents=True, exist_ok=True)
        run_file = parts_dir / "run.json"
        if run_file.exists():
            created = parts.check_identity(run_file, identity)
        else:
            created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            tmp = run_file.with_name("run.json.tmp")
            tmp.write_text(json.dumps({**identity, "created_utc": created}, indent=1), encoding="utf-8")
            os.replace(tmp, run_file)
        for stale in parts_dir.glob("*.tmp.npz"):
            stale.unlink()

        done = parts.committed(parts_dir)
        cursor = parts.part_end(done[-1]) if done else 0
        failures: list[Failure] = []
        for p in done:
            failures += parts.read_part(p, ())["failures"]
        resumed_at = cursor
        if cursor:
            log.info("%s/%s: resuming at record %d of %d", dataset, split, cursor, len(records))

        reader.prepare(records[cursor:])
        _run_batches(encoder, records, modalities, cursor, parts_dir, failures, fails_path,
                     batch_size=batch_size, commit_every=commit_every, workers=workers,
                     max_failures=max_failures, progress=progress, desc=f"{dataset}/{split}"
                     + (f" [{shard}/{num_shards}]" if num_shards > 1 else ""), tqdm=tqdm,
                     position=shard if num_shards > 1 else None)

        extra = {k: _json_attr(v) for k, v in encoder.attributes().items()}
        n_failed = len({f.id for f in failures})
        extra.update({"records_fingerprint": fp, "expected_records": len(records), "failures": n_failed,
                      "shard": shard, "num_shards": num_shards, "limit": -1 if limit is None else int(limit),
                      "reader_layout": reader.layout, "records_offset": lo})
        meta = ShardMeta(backbone=encoder.name, dataset=dataset, split=split, dim=int(encoder.dim),
                         modalities=modalities, normalized=True, checkpoint=encoder.checkpoint,
                         cmcl_version=__version__, created_utc=created, extra=extra)
        parts.write_failures(fails_path, failures)
        rows = _assemble(path, meta, parts_dir, modalities, encoder, reader, batch_size)
        shutil.rmtree(parts_dir)
        if failures:
            log.warning("%s/%s: %d input(s) failed and were left out; see %s", dataset, split, n_failed, fails_path)
        return ExtractResult(dataset, split, path, rows, len(records), failures, fails_path,
                             "resumed" if resumed_at else "written", resumed_at)


def _run_batches(encoder, records, modalities, cursor, parts_dir, failures, fails_path, *, batch_size,
                 commit_every, workers, max_failures, progress, desc, tqdm, position=None) -> None:
    """Embed ``records[cursor:]`` and commit a part every ``commit_every`` records."""
    if cursor >= len(records):
        return
    preps = {m: encoder.preprocessor(m) for m in modalities}
    batches = [list(range(s, min(s + batch_size, len(records)))) for s in range(cursor, len(records), batch_size)]
    # Workers are fresh interpreters (spawn): a fork after torch has started its thread pool can
    # deadlock in the child's first tensor operation.
    loader = DataLoader(_Items(records, preps), batch_sampler=batches, collate_fn=_collate,
                        num_workers=workers, prefetch_factor=4 if workers else None,
                        multiprocessing_context="spawn" if workers else None)
    has_text = all(r.text is not None for r in records)
    dim = int(encoder.dim)

    def new_block(start: int) -> dict:
        return {"start": start, "ids": [], "labels": [], "text": [] if has_text else None,
                "emb": {m: [] for m in modalities}, "failures": [], "dim": dim}

    block = new_block(cursor)
    bar = tqdm(total=len(records), initial=cursor, unit="item", desc=desc, disable=not progress,
               dynamic_ncols=True, smoothing=0.1, position=position)
    try:
        for (positions, tensors, fails), idx in zip(loader, batches):
            embs = {}
            if positions:
                for m in modalities:
                    x = np.asarray(encoder.encode_batch(m, tensors[m]), dtype=np.float32)
                    if x.shape != (len(positions), dim):
                        raise ExtractError(f"{encoder.name}.encode_batch({m!r}) returned shape {x.shape}, "
                                           f"expected ({len(positions)}, {dim})")
                    embs[m] = x
            keep = np.ones(len(positions), dtype=bool)
            for m, x in embs.items():
                bad = ~np.isfinite(x).all(axis=1)
                for j in np.flatnonzero(bad & keep):
                    r = records[positions[j]]
                    fails.append(Failure(r.id, m, r.data.get(m, "") if m != "text" else "",
                                         "non-finite embedding"))
                keep &= ~bad
            block["failures"] += fails
            for j in np.flatnonzero(keep):
                r = records[positions[j]]
                block["ids"].append(r.id)
                block["labels"].append(r.label)
                if has_text:
                    block["text"].append(r.text)
            for m, x in embs.items():
                block["emb"][m].append(x[keep])
            bar.update(len(idx))
            n_failed = len({f.id for f in failures}) + len({f.id for f in block["failures"]})
            if n_failed > max_failures:
                parts.write_failures(fails_path, failures + block["failures"])
                raise ExtractError(f"{n_failed} input(s) failed, more than --max-failures {max_failures}; "
                                   f"they are listed in {fails_path}. Fix them, or raise --max-failures "
                                   f"and run again: the run resumes at record {block['start']}")
            end = idx[-1] + 1
            if end - block["start"] >= commit_every or end == len(records):
                parts.write_part(parts_dir, block["start"], end, block)
                failures += block["failures"]
                block = new_block(end)
    finally:
        bar.close()


def _assemble(path: Path, meta: ShardMeta, parts_dir: Path, modalities, encoder, reader, batch_size) -> int:
    """Copy the committed parts into the shard (atomic through ``FeatureWriter``)."""
    rows = 0
    with FeatureWriter(path, meta, overwrite=True, check_blocks=True) as w:
        for p in parts.committed(parts_dir):
            part = parts.read_part(p, modalities)
            if part["ids"]:
                w.append(part["ids"], part["labels"], part["emb"], part["text"])
                rows += len(part["ids"])
        if rows == 0:
            raise ExtractError(f"{path}: every input of this shard failed and a cache file cannot be empty; "
                               f"see the failures listed in {failures_path(path)} (or use fewer shards)")
        names = reader.class_names()
        if names:
            w.set_classes(names, {"text": _embed_classes(encoder, reader.class_texts(), batch_size)})
    return rows


def _existing(path: Path, fails_path: Path, dataset: str, split: str, fp: str, n: int) -> ExtractResult:
    """An existing shard made from the same records is kept; anything else needs --overwrite."""
    try:
        with FeatureShard(path) as sh:
            have = sh.meta.extra.get("records_fingerprint")
            rows = len(sh)
    except CacheError as exc:
        raise ExtractError(f"{exc}; pass --overwrite to extract it again") from None
    if have is not None and str(have) != fp:
        raise ExtractError(f"{path} exists but was made from other records (fingerprint {have}, now {fp}); "
                           f"pass --overwrite to replace it")
    fails = read_failures(fails_path) if fails_path.exists() else []
    return ExtractResult(dataset, split, path, rows, n, fails, fails_path, "exists")


def _other_forms(out, backbone: str, dataset: str, split: str, path: Path) -> list[Path]:
    """Files of the same split in another sharding (they would make the split ambiguous)."""
    folder = Path(out) / backbone / dataset
    if not folder.is_dir():
        return []
    mine = parse_shard_name(path.name)
    found = []
    for p in folder.iterdir():
        if p == path:
            continue
        other = parse_shard_name(p.name)
        if p.name == f"{split}.h5" or (other and other[0] == split and (mine is None or other[2] != mine[2])):
            found.append(p)
    return sorted(found)


def _check_other_forms(out, backbone, dataset, split, path) -> None:
    other = _other_forms(out, backbone, dataset, split, path)
    if other:
        raise ExtractError(f"{path.parent} already holds {[p.name for p in other]} for split {split!r}, in another "
                           f"sharding; pass --overwrite (or remove them) to write {path.name}")


def _remove_other_forms(out, backbone, dataset, split, path) -> None:
    for p in _other_forms(out, backbone, dataset, split, path):
        p.unlink(missing_ok=True)
        failures_path(p).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ front door
def extract(encoder: Encoder, dataset: str, split: str, data_root: str | os.PathLike,
            out: str | os.PathLike, *, limit: int | None = None, overwrite: bool = False,
            max_failures: int = 0, num_shards: int | None = None, shard: int | None = None,
            workers: int = 0, batch_size: int = 64, commit_every: int = 1024,
            cache_dir: str | os.PathLike | None = None, reader_options: Mapping[str, Any] | None = None,
            progress: bool = True, environ: Mapping[str, str] | None = None) -> list[ExtractResult]:
    """``cmcl extract``: embed ``split`` (``train``, ``test`` or ``all``) of ``dataset``.

    The shard comes from ``shard``/``num_shards`` or, when both are ``None``, from torchrun's
    ``RANK``/``WORLD_SIZE``. ``cache_dir`` (default ``<out>/.media``) receives media the reader
    derives (ESC-50's WAVs from parquet, VGGSound audio tracks). Other arguments: see
    :func:`extract_split`.
    """
    rank, world = resolve_shard(shard, num_shards, environ)
    splits = ("train", "test") if split == "all" else (split,)
    reader = get_reader(dataset, data_root, cache_dir=cache_dir or Path(out) / ".media",
                        **dict(reader_options or {}))
    for s in splits:
        if s not in reader.splits:
            raise ExtractError(f"{dataset}: unknown split {s!r}; choose from {list(reader.splits)} or 'all'")
    return [extract_split(encoder, reader, s, out, limit=limit, overwrite=overwrite, max_failures=max_failures,
                          shard=rank, num_shards=world, workers=workers, batch_size=batch_size,
                          commit_every=commit_every, progress=progress) for s in splits]
