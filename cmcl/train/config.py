"""Training configuration: one frozen dataclass, resolved once and saved with the run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cmcl.errors import ConfigError
from cmcl.train.objective import LOSS_DIRECTIONS
from cmcl.types import RECALL_PROTOCOLS

HARNESSES = ("paper", "reference")


@dataclass(frozen=True)
class Harness:
    """Optimiser behaviour around the strategy hooks.

    Attributes:
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        decay_bias: whether biases are decayed too.
        linear_decay: linear learning-rate decay to 0 over each step's updates (no warm-up).
        clip_norm: global gradient-norm clipping before ``before_update``; ``None`` for none.
        optimizer: ``"adamw"`` (the paper's) or ``"sgd"`` (plain gradient descent with decoupled
            weight decay: the setting DNS's stability guarantee is proved for).
    """

    lr: float
    weight_decay: float
    decay_bias: bool
    linear_decay: bool
    clip_norm: float | None
    optimizer: str = "adamw"


OPTIMIZERS = ("adamw", "sgd")


def harness(name: str, backbone: str, lr: float | None, weight_decay: float, optimizer: str = "adamw") -> Harness:
    """Resolve a harness by name.

    ``paper``: AdamW with a constant learning rate (1e-4), weight decay 1e-3 on every parameter,
    no clipping, as the paper states. ``reference``: the authors' HF-Trainer behaviour: linear decay
    to 0 within each step, grad-norm clipping at 1.0 before the strategy's gradient hook, no weight
    decay on biases, and lr 1e-3 for LanguageBind (a silent override in their ``training.py``).
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if name == "paper":
        return Harness(lr if lr is not None else 1e-4, weight_decay, True, False, None, optimizer)
    if name == "reference":
        default_lr = 1e-3 if backbone == "languagebind" else 1e-4
        return Harness(lr if lr is not None else default_lr, weight_decay, False, True, 1.0, optimizer)
    raise ConfigError(f"unknown harness {name!r}; expected one of {', '.join(HARNESSES)}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run's numbers.

    Attributes:
        features: feature-cache root.
        backbone: backbone folder in the cache.
        strategy: registered strategy name.
        params: resolved strategy hyperparameters.
        label: run label (the strategy name, or name[k=v,...] when parameters were overridden).
        seed: run seed (batch order and strategy randomness).
        protocol: protocol name or path; ``protocol_sha256`` pins its content.
        epochs, batch_size: per step.
        lr: learning rate; ``None`` for the harness default.
        weight_decay: AdamW weight decay.
        temperature, loss: InfoNCE settings (``loss``: ``a2b`` or ``symmetric``).
        harness: ``paper`` or ``reference``.
        optimizer: ``adamw`` (default) or ``sgd``.
        recall_protocol, pool_size, pool_count, eval_seed: evaluation (see EvalSettings).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (not part of the config identity).
    """

    features: str
    backbone: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    seed: int = 0
    protocol: str = "paper11"
    protocol_sha256: str = ""
    epochs: int = 5
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 1e-3
    temperature: float = 1.0
    loss: str = "a2b"
    harness: str = "paper"
    optimizer: str = "adamw"
    recall_protocol: str = "paper"
    pool_size: int = 1000
    pool_count: int = 5
    eval_seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch size must be >= 2 (InfoNCE needs in-batch negatives), got {self.batch_size}")
        if self.loss not in LOSS_DIRECTIONS:
            raise ConfigError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSS_DIRECTIONS)}")
        if self.recall_protocol not in RECALL_PROTOCOLS:
            raise ConfigError(f"unknown recall protocol {self.recall_protocol!r}; expected paper or full")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        harness(self.harness, self.backbone, self.lr, self.weight_decay, self.optimizer)

    def resolved_harness(self) -> Harness:
        """The optimiser settings this config implies."""
        return harness(self.harness, self.backbone, self.lr, self.weight_decay, self.optimizer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that must match for ``--resume`` (everything but the device)."""
        d = self.to_dict()
        d.pop("device")
        return d

    def fingerprint(self) -> str:
        """Short hash of :meth:`identity`."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]


def make_label(strategy: str, overrides: dict[str, Any]) -> str:
    """``dns`` or ``dns[lambda_min=0.1]``: the name shown in Table 2 and used as the run folder."""
    if not overrides:
        return strategy
    return f"{strategy}[{','.join(f'{k}={v}' for k, v in sorted(overrides.items()))}]"
