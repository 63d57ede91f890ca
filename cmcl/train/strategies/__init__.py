"""Strategy registry: a literal dict from name (= module stem) to class.

Add a method by writing ``strategies/<name>.py`` with a :class:`~cmcl.train.strategies.base.Strategy`
subclass (its hyperparameters in its ``Params`` dataclass) and listing it here; the trainer is never edited.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Mapping

from cmcl.errors import ConfigError
from cmcl.train.strategies.base import Objective, Strategy, make_params
from cmcl.train.strategies.cflat import CFlat
from cmcl.train.strategies.cila import CILA
from cmcl.train.strategies.co2l import Co2L
from cmcl.train.strategies.der import DER
from cmcl.train.strategies.derpp import DERpp
from cmcl.train.strategies.dns import DNS
from cmcl.train.strategies.ewc import EWC
from cmcl.train.strategies.gem import GEM
from cmcl.train.strategies.gnsp import GNSP
from cmcl.train.strategies.mnl import MNL
from cmcl.train.strategies.pnr import PNR
from cmcl.train.strategies.vanilla import Vanilla
from cmcl.train.strategies.zo import ZO

STRATEGIES: dict[str, type[Strategy]] = {
    "vanilla": Vanilla,
    "gem": GEM,
    "der": DER,
    "derpp": DERpp,
    "ewc": EWC,
    "co2l": Co2L,
    "cflat": CFlat,
    "cila": CILA,
    "dns": DNS,
    # related work (issue 4); they sort after the paper's nine
    "pnr": PNR,
    "zo": ZO,
    "mnl": MNL,
    # DNS's closest newer relative (issue 10)
    "gnsp": GNSP,
}

#: The paper's Table 2 order; strategies not listed follow alphabetically.
PAPER_ORDER = ("vanilla", "gem", "der", "derpp", "ewc", "co2l", "cflat", "cila", "dns")


def strategy_order(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Sort strategy names (or labels starting with a name) in the paper's order."""
    def key(label: str) -> tuple[int, str]:
        base = label.split("[", 1)[0]
        return (PAPER_ORDER.index(base) if base in PAPER_ORDER else len(PAPER_ORDER), label)
    return sorted(names, key=key)


def all_strategies() -> list[str]:
    """Every registered strategy, in the paper's order (what ``--strategy all`` runs)."""
    return strategy_order(list(STRATEGIES))


def strategy_parameters(name: str) -> dict[str, Any]:
    """The hyperparameters of a strategy (its ``Params`` fields) and their defaults."""
    return {f.name: f.default for f in fields(_lookup(name).Params)}


def _lookup(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(all_strategies())} or 'all'") from None


def resolve_params(name: str, params: Mapping[str, Any], backbone: str | None = None) -> dict[str, Any]:
    """Defaults, then the backbone's overrides, then ``params``, validated (:func:`~.base.make_params`)."""
    cls = _lookup(name)
    return asdict(make_params(name, cls.Params, {**cls.backbone_defaults.get(backbone, {}), **params}))


def get_strategy(name: str, backbone: str | None = None, **params: Any) -> Strategy:
    """Build a strategy from its name and hyperparameters (see :func:`resolve_params`)."""
    return _lookup(name)(**resolve_params(name, params, backbone))


__all__ = ["STRATEGIES", "PAPER_ORDER", "Objective", "Strategy", "all_strategies", "get_strategy",
           "resolve_params", "strategy_order", "strategy_parameters"]
