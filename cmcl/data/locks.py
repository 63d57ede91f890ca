"""Exclusive locks on files and folders that one process writes at a time.

A run folder or a feature shard being written by two processes would be corrupted silently, so
writers hold ``.<name>.lock`` beside the path (a ``filelock`` lock, released by the operating system
if the process dies; the empty hidden file stays, as lock files of other tools do) and a second writer fails at once with one line naming what is busy. Within a
process the lock is re-entrant, so nested writers (the extraction engine around its ``FeatureWriter``)
share it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from cmcl.errors import CMCLError


class BusyError(CMCLError):
    """Another process is writing the same run folder or feature file."""


_held: dict[str, tuple[FileLock, int]] = {}
_guard = threading.Lock()


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file guarding ``path``: the hidden ``.<name>.lock`` beside it."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def acquire(path: str | os.PathLike, what: str) -> None:
    """Take the lock of ``path`` (creating its parent folder) or raise :class:`BusyError` at once."""
    key = str(Path(path).resolve())
    with _guard:
        if key in _held:
            lock, n = _held[key]
            _held[key] = (lock, n + 1)
            return
        lp = lock_path(path)
        lp.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lp), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise BusyError(f"{path}: busy: another process is writing this {what} (lock {lp.name}); "
                            f"wait for it to finish") from None
        _held[key] = (lock, 1)


def release(path: str | os.PathLike) -> None:
    """Release one hold of the lock of ``path`` (the file lock goes when the last hold does)."""
    key = str(Path(path).resolve())
    with _guard:
        if key not in _held:
            return
        lock, n = _held.pop(key)
        if n > 1:
            _held[key] = (lock, n - 1)
        else:
            lock.release()


@contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock of ``path`` for the block (see :func:`acquire`)."""
    acquire(path, what)
    try:
        yield
    finally:
        release(path)


def is_locked(path: str | os.PathLike) -> bool:
    """Whether another process holds the lock of ``path`` now (probes without waiting)."""
    lp = lock_path(path)
    if not lp.exists():
        return False
    lock = FileLock(str(lp), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False
