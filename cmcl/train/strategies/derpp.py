"""DER++: DER plus a ground-truth term on a second buffer draw (baselines.md §5).

The ground truth of a stored pair is "same instance" (label 1), so the term is
``beta * mean_j softplus(-s_j(theta))`` (BCE-with-logits against 1, positives only: the literal
mammoth port; no negatives are added). ``beta`` defaults to the paper's 0.001 (ImageBind, UniBind,
synthetic) and 0.1 for LanguageBind; the appendix names this weight alpha (baselines.md §11.3).
Everything else is :class:`~cmcl.train.strategies.der.DER`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmcl.train.strategies.base import param
from cmcl.train.strategies.der import DER


class DERpp(DER):
    """DER with the ground-truth (matched-pair BCE) replay term."""

    @dataclass(frozen=True)
    class Params(DER.Params):
        beta: float = param(0.001, ge=0)        # weight of the ground-truth term

    name = "derpp"
    backbone_defaults = {"languagebind": {"beta": 0.1}}
