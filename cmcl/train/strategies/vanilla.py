"""Vanilla: sequential fine-tuning with the base contrastive loss and nothing carried between steps."""

from cmcl.train.strategies.base import Strategy


class Vanilla(Strategy):
    """Plain sequential training (the lower bound of every continual method)."""

    name = "vanilla"
