"""Protocols: the ordered sequence of (dataset, modality pair) steps, and which metrics apply.

A protocol is a TOML file::

    name = "paper11"
    [datasets]
    esc50 = { metrics = ["recall", "acc"] }
    [[step]]
    dataset = "esc50"
    modalities = ["text", "audio"]     # [a, b]: a is the anchor (row) side of the loss

``metrics`` per dataset lists ``"recall"`` and/or ``"acc"``; zero-shot accuracy is scored only on
steps whose pair contains ``text`` and whose test split stores class prototypes. A step may
override its dataset's list with its own ``metrics = [...]``. The shipped protocols live in
``cmcl/protocols/`` and are named by their file stem (``paper11``).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cmcl.errors import ProtocolError
from cmcl.types import Step, check_modality_name

METRIC_KINDS = ("recall", "acc")


@dataclass(frozen=True)
class ProtocolStep(Step):
    """A protocol's step: a :class:`~cmcl.types.Step` and the metric kinds scored on its test split."""

    metrics: tuple[str, ...]

    @property
    def has_recall(self) -> bool:
        """Whether Recall@k is scored on this step."""
        return "recall" in self.metrics

    @property
    def has_acc(self) -> bool:
        """Whether zero-shot accuracy is scored (needs text in the pair)."""
        return "acc" in self.metrics and "text" in self.modalities


@dataclass(frozen=True)
class Protocol:
    """An ordered list of steps, with the file it came from and a content hash."""

    name: str
    steps: tuple[ProtocolStep, ...]
    source: str
    sha256: str

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def datasets(self) -> tuple[str, ...]:
        """Datasets in order of first use."""
        return tuple(dict.fromkeys(s.dataset for s in self.steps))

    def modalities_of(self, dataset: str) -> tuple[str, ...]:
        """Every modality the protocol uses from ``dataset``."""
        seen: dict[str, None] = {}
        for s in self.steps:
            if s.dataset == dataset:
                seen.update(dict.fromkeys(s.modalities))
        return tuple(seen)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every modality the protocol trains, in order of first use."""
        return tuple(dict.fromkeys(m for s in self.steps for m in s.modalities))


def shipped_protocols() -> list[str]:
    """Names of the protocols shipped with cmcl."""
    folder = resources.files("cmcl") / "protocols"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_protocol(name_or_path: str | Path) -> Protocol:
    """Load a shipped protocol by name (``"paper11"``) or a TOML file by path.

    Raises:
        ProtocolError: the file is missing or malformed, naming it and the problem.
    """
    text_name = str(name_or_path)
    if text_name in shipped_protocols():
        source = f"cmcl/protocols/{text_name}.toml"
        raw = (resources.files("cmcl") / "protocols" / f"{text_name}.toml").read_bytes()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ProtocolError(f"{path}: no such protocol file (shipped protocols: {', '.join(shipped_protocols())})")
        source = str(path)
        raw = path.read_bytes()
    return parse_protocol(raw, source)


def parse_protocol(raw: bytes, source: str) -> Protocol:
    """Parse protocol TOML bytes; ``source`` names the file in errors."""
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"name", "datasets", "step"}
    if unknown:
        raise ProtocolError(f"{source}: unknown top-level keys {sorted(unknown)} (expected name, datasets, step)")
    datasets = doc.get("datasets", {})
    if not isinstance(datasets, dict):
        raise ProtocolError(f"{source}: [datasets] must be a table")
    for dataset, entry in datasets.items():
        if not isinstance(entry, dict):
            raise ProtocolError(f"{source}: [datasets] {dataset} must be a table like "
                                f"{dataset} = {{ metrics = [\"recall\"] }}")
    steps_raw = doc.get("step")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ProtocolError(f"{source}: no [[step]] entries")
    steps = []
    for i, entry in enumerate(steps_raw, start=1):
        where = f"{source}: step {i}"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where}: must be a table")
        extra = set(entry) - {"dataset", "modalities", "metrics"}
        if extra:
            raise ProtocolError(f"{where}: unknown keys {sorted(extra)}")
        dataset = entry.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise ProtocolError(f"{where}: 'dataset' must be a non-empty string")
        mods = entry.get("modalities")
        if not (isinstance(mods, list) and len(mods) == 2 and all(isinstance(m, str) for m in mods)):
            raise ProtocolError(f"{where}: 'modalities' must be a list of two names [a, b]")
        if mods[0] == mods[1]:
            raise ProtocolError(f"{where}: the pair {mods} repeats a modality")
        for m in mods:
            try:
                check_modality_name(m)
            except ValueError as exc:
                raise ProtocolError(f"{where}: {exc}") from None
        metrics = entry.get("metrics", datasets.get(dataset, {}).get("metrics", ["recall"]))
        if (not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics)
                or not set(metrics) <= set(METRIC_KINDS)):
            raise ProtocolError(f"{where}: metrics must be a non-empty subset of {list(METRIC_KINDS)}, got {metrics!r}")
        steps.append(ProtocolStep(i, dataset, (mods[0], mods[1]), tuple(metrics)))
    name = doc.get("name", Path(source).stem)
    return Protocol(str(name), tuple(steps), source, hashlib.sha256(raw).hexdigest())
