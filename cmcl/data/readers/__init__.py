"""Readers of the seven CMCL datasets, and ``pairs`` for your own; see :mod:`cmcl.data.readers.base`.

``READERS`` maps the dataset's cache name to its reader class; :func:`get_reader` builds one and
rejects unknown options with the accepted ones.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Iterable

from cmcl.data.readers.base import NO_LABEL, DatasetReader, Record, Skip, fingerprint
from cmcl.data.readers.clotho import Clotho
from cmcl.data.readers.esc50 import ESC50
from cmcl.data.readers.llvip import LLVIP
from cmcl.data.readers.nyudv2 import NYUDv2
from cmcl.data.readers.pairs import Pairs
from cmcl.data.readers.tvl import TVL
from cmcl.data.readers.ucf101 import UCF101
from cmcl.data.readers.vggsound_s import VGGSoundS
from cmcl.errors import DatasetError
from cmcl.keyvalue import coerce, parse_value, split_assignment

#: dataset name -> reader class (literal, in protocol order).
READERS: dict[str, type[DatasetReader]] = {
    "ucf101": UCF101,
    "esc50": ESC50,
    "nyudv2": NYUDv2,
    "clotho": Clotho,
    "vggsound_s": VGGSoundS,
    "tvl": TVL,
    "llvip": LLVIP,
}

#: Generic readers of a user's own data (not one of the paper's datasets): ``pairs`` reads a manifest.
GENERIC: dict[str, type[DatasetReader]] = {"pairs": Pairs}
_ALL: dict[str, type[DatasetReader]] = {**READERS, **GENERIC}


def reader_options(name: str) -> list[str]:
    """Keyword options the reader of ``name`` accepts besides ``data_root`` and ``cache_dir``."""
    params = inspect.signature(_ALL[name].__init__).parameters
    return [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p != "cache_dir"]


def parse_reader_options(name: str, pairs: Iterable[str]) -> dict[str, Any]:
    """Turn CLI ``KEY=VALUE`` strings into reader options, typed like each option's default.

    ``DATASET.KEY=VALUE`` applies to that dataset only (other datasets ignore it), so one command
    line can carry options for several datasets. Values are parsed as ``-p`` values are
    (:mod:`cmcl.keyvalue`); paths and names stay as typed.

    Example: ``parse_reader_options("vggsound_s", ["manifest=subset.csv", "ucf101.split_set=2"])``
    gives ``{"manifest": "subset.csv"}``.
    """
    if name not in _ALL:
        raise DatasetError(f"unknown dataset {name!r}; choose from {sorted(_ALL)}")
    params = inspect.signature(_ALL[name].__init__).parameters
    allowed = reader_options(name)
    out: dict[str, Any] = {}
    for pair in pairs:
        try:
            scope, key, value = split_assignment(pair)
        except ValueError:
            scope, key, value = None, "", ""
        if scope is not None and scope in _ALL:
            if scope != name:
                continue
        elif scope is not None:
            key = f"{scope}.{key}"
        if key not in allowed:
            raise DatasetError(f"{name}: bad reader option {pair!r}; "
                               f"expected KEY=VALUE with KEY in {allowed or 'none'}")
        default = params[key].default
        if default is None or isinstance(default, str):  # paths and names stay as typed
            out[key] = value
            continue
        try:
            out[key] = coerce(parse_value(value), default)
        except ValueError as exc:
            raise DatasetError(f"{name}: reader option {key} {exc}") from None
    return out


def get_reader(name: str, data_root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
               **options) -> DatasetReader:
    """Build the reader of dataset ``name``; raises :class:`DatasetError` on an unknown name or option."""
    if name not in _ALL:
        raise DatasetError(f"unknown dataset {name!r}; choose from {sorted(_ALL)}")
    allowed = reader_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DatasetError(f"{name}: unknown reader option(s) {unknown}; accepted: {allowed or 'none'}")
    return _ALL[name](data_root, cache_dir=cache_dir, **options)


__all__ = ["READERS", "GENERIC", "Pairs", "NO_LABEL", "DatasetReader", "Record", "Skip", "fingerprint", "get_reader",
           "parse_reader_options", "reader_options"]
