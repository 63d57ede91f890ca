"""Reading checkpoint files safely and matching them against an architecture.

Every checkpoint is read with ``weights_only=True`` (PyTorch's restricted unpickler), memory-mapped
when the file is in the zip format, so a 5 GB file costs no RAM until tensors are used. Models are
built on the ``meta`` device and filled with ``load_state_dict(assign=True)``, so the weights are
never held twice. :func:`compare_keys` is the strict key check: it reports missing, unexpected and
mis-shaped keys, and :class:`KeyReport` is what ``cmcl extract --check-checkpoint`` prints.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmcl.errors import EncoderError

#: keys we drop silently: buffers that older library versions saved but that carry no weights.
IGNORABLE_SUFFIXES = (".position_ids",)


def missing_checkpoint_error(backbone: str, what: str, source: str, option: str, env: str,
                             path: str | os.PathLike | None = None) -> EncoderError:
    """The one-line error for an absent checkpoint: what file, where to get it, how to point at it."""
    if path is None:
        where = "no checkpoint given; "
    elif Path(path).exists():
        where = f"{path} is not a file; "
    else:
        where = f"{path} does not exist; "
    return EncoderError(f"{backbone}: {where}expected {what} (download: {source}); pass it with "
                        f"{option} PATH or set {env}=PATH, or use --random-weights tiny for a smoke test")


def resolve_path(given: str | os.PathLike | None, env: str) -> Path | None:
    """``given`` if set, else the environment variable ``env``, else ``None``."""
    if given:
        return Path(given).expanduser()
    value = os.environ.get(env, "").strip()
    return Path(value).expanduser() if value else None


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def read_torch_state(path: str | os.PathLike, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` a checkpoint on the CPU with ``weights_only=True`` (memory-mapped if possible).

    Args:
        path: a ``.pth``/``.pt``/``.bin`` file written by ``torch.save``.
        trust_pickle: fall back to the unrestricted unpickler when the restricted one refuses the
            file. Only for files from a source the user trusts; off by default.
    """
    path = Path(path)
    mmap = _is_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(
                f"{path}: refused by the safe loader (weights_only=True): {first}. If you trust the "
                f"file's source, pass --trust-checkpoint-pickle to load it with the full unpickler"
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError) as exc:
        raise EncoderError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (memory-mapped by the library)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own exception types
        raise EncoderError(f"{path}: not a readable safetensors file ({exc})") from None


def state_dict_of(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint (a bare state dict, or one under
    ``state_dict``/``model``/``module``)."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        # a mixed mapping: keep its tensors, the caller's key check reports what is missing
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise EncoderError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def drop_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix that ``DistributedDataParallel`` dumps carry on every key."""
    if state and all(k.startswith("module.") for k in state):
        return strip_prefix(state, "module.")
    return dict(state)


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, without touching tensor data."""
    return {k: tuple(v.shape) for k, v in tensors.items()}


@dataclass
class KeyReport:
    """Result of matching a checkpoint's keys and shapes against an architecture.

    Attributes:
        missing: keys the architecture needs that the checkpoint lacks.
        unexpected: keys in the checkpoint that the architecture does not have.
        mismatched: ``(key, checkpoint shape, expected shape)`` for keys present in both.
        matched: number of keys present in both with equal shapes.
        ignored: keys dropped on purpose (stale buffers, parts kept aside such as UniBind's point encoder).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    matched: int = 0
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the checkpoint fits exactly."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 5) -> str:
        """One line: counts and the first few offending keys of each kind."""
        def head(items: Iterable[Any]) -> str:
            items = list(items)
            shown = ", ".join(str(x) for x in items[:limit])
            return shown + (f", ... (+{len(items) - limit})" if len(items) > limit else "")

        parts = [f"{self.matched} keys match"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing [{head(self.missing)}]")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected [{head(self.unexpected)}]")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} with other shapes "
                         f"[{head(f'{k}: file {a} vs model {b}' for k, a, b in self.mismatched)}]")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored on purpose")
        return "; ".join(parts)


def compare_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                 ignored: Iterable[str] = ()) -> KeyReport:
    """Strict comparison of two key -> shape maps."""
    report = KeyReport(ignored=sorted(ignored))
    for k, shape in expected.items():
        if k not in found:
            report.missing.append(k)
        elif tuple(found[k]) != tuple(shape):
            report.mismatched.append((k, tuple(found[k]), tuple(shape)))
        else:
            report.matched += 1
    report.unexpected = [k for k in found if k not in expected]
    return report


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model's state dict (works on ``meta`` models)."""
    return shapes_of(model.state_dict())


def drop_ignorable(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split off keys that carry no weights (see :data:`IGNORABLE_SUFFIXES`)."""
    kept, dropped = {}, []
    for k, v in state.items():
        (dropped.append(k) if k.endswith(IGNORABLE_SUFFIXES) else kept.__setitem__(k, v))
    return kept, dropped


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str,
                ignored: Iterable[str] = ()) -> KeyReport:
    """Check keys and shapes, then assign the tensors into ``model`` (built on ``meta`` or not).

    Raises:
        EncoderError: naming ``where`` and listing missing, unexpected and mis-shaped keys.
    """
    report = compare_keys(expected_shapes(model), shapes_of(state), ignored)
    if not report.ok:
        raise EncoderError(f"{where}: the checkpoint does not fit this architecture: {report.summary()}")
    model.load_state_dict(dict(state), strict=True, assign=True)
    return report


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


# ----------------------------------------------------------------- restricted pickle reading
def _storage_from_bytes(data: bytes) -> Any:
    # torch pickles each storage as a nested legacy torch.save blob; read it safely as well
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds containers, tensors and numpy arrays; any other global is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_tensor_pickle(path: str | os.PathLike) -> Any:
    """Read a pickle (or ``torch.save`` file) that may only hold dicts, lists, tensors and arrays."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: no such file")
    if _is_zip(path):
        return read_torch_state(path)
    try:
        with open(path, "rb") as f:
            return _TensorOnlyUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise EncoderError(f"{path}: refused by the restricted unpickler ({exc}); it may only hold "
                           f"dicts of tensors or arrays") from None
