"""``KEY=VALUE`` options from the command line: one parser for strategy (``-p``) and reader (``-r``) options.

``SCOPE.KEY=VALUE`` scopes an option to one strategy or dataset. Values are parsed once
(:func:`parse_value`) and then checked against the type of the option's default (:func:`coerce`),
so ``-p`` and ``-r`` agree on what ``true``, ``3`` or ``1e-3`` mean.
"""

from __future__ import annotations

import math
from typing import Any

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def parse_value(text: str) -> Any:
    """``true/yes/on`` and ``false/no/off`` (any case), ``none/null``, an int, a float, else the string."""
    low = text.strip().lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_assignment(item: str) -> tuple[str | None, str, str]:
    """``"scope.key=value"`` into ``(scope, key, value)`` (scope ``None`` when absent; dashes in keys
    become underscores). Raises ``ValueError`` without an ``=``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{item!r}: expected key=value (or scope.key=value)")
    scope, dot, rest = key.strip().partition(".")
    return (scope, rest.replace("-", "_"), value) if dot else (None, scope.replace("-", "_"), value)


def coerce(value: Any, default: Any) -> Any:
    """``value`` checked against the type of ``default`` (ints are accepted for floats, numbers must be
    finite); raises ``ValueError`` naming what was expected."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"expects true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"expects an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expects a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"expects a finite number, got {value!r}")
        return float(value) if isinstance(default, float) else value
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)  # a name that parses as a number ("-r manifest=2024")
    return value
