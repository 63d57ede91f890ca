"""DER++: DER plus a ground-truth term on a second buffer draw (baselines.md §5).

The ground truth of a stored pair is "same instance" (label 1), so the term is
``beta * mean_j softplus(-s_j(theta))`` (BCE-with-logits against 1, positives only: the literal
mammoth port; no negatives are added). ``beta`` defaults to the paper's 0.001 (ImageBind, UniBind,
synthetic) and 0.1 for LanguageBind; the appendix names this weight alpha (baselines.md §11.3).
Everything else is :class:`~cmcl.train.strategies.der.DER`.
"""

from __future__ import annotations

from cmcl.train.strategies.der import DER


class DERpp(DER):
    """DER with the ground-truth (matched-pair BCE) replay term."""

    name = "derpp"
    backbone_defaults = {"languagebind": {"beta": 0.1}}

    def __init__(self, *, alpha: float = 0.1, beta: float = 0.001, buffer_size: int = 256,
                 replay_batch: int = 64) -> None:
        super().__init__(alpha=alpha, buffer_size=buffer_size, replay_batch=replay_batch)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
