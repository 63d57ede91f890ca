"""The strategy interface: the trainer owns the loop, strategies only hook into it.

The trainer (:mod:`cmcl.train.trainer`) runs, for every protocol step::

    strategy.before_step(step, data)            # projectors, teacher snapshot, coefficients
    train = strategy.training_set(step, data)   # default: data; replay methods add their buffer
    fresh optimizer and scheduler over the learners but strategy.frozen(step), plus
        strategy.optimizer_groups(step) (parameters a strategy trains, e.g. PNR's predictors)
    for each epoch, for each batch of `train`:
        losses, out = strategy.compute_gradients(closure)   # default: closure() once
        clip the learners' gradients (reference harness); out.grad_scale is the factor applied
        strategy.before_update(batch, out)      # the only hook that edits .grad (in place)
        optimizer.step(); scheduler.step()
        strategy.after_update(batch, out)       # e.g. reservoir insertion
    strategy.after_step(step, data)             # covariances, Fisher, buffer fill
    the run scores every step's test split

The closure clears the optimizer's gradients, runs ``learners.forward_pairs(batch,
strategy.extra_inputs(batch))`` (``out.extra`` holds the outputs of rows a strategy forwards with
the batch; ``out.epoch`` and ``out.update`` say where in the step the batch falls; with
``output_grads`` the trainer keeps ``out.u.grad`` and ``out.v.grad``, the loss's gradients with
respect to the outputs), calls ``strategy.losses(batch, out)`` and back-propagates the sum of the
returned ``*_loss`` terms.

Rules every strategy follows (checked by ``tests/test_strategy_contract.py``): hooks never step the
optimizer; ``losses`` returns finite scalars keyed ``*_loss``; step 1 needs no special case;
learners the batch does not use keep ``grad is None``; ``state_dict`` round-trips through a
checkpoint (tensors, numbers, strings, lists and dicts only, loadable with ``weights_only=True``).

Hyperparameters are declared once, as the fields of the strategy's frozen ``Params`` dataclass,
each with its default and its constraint (:func:`param`); :func:`make_params` checks type and
constraint for the registry, the CLI and direct construction (``DNS(lambda_min=0.1)``) alike.
"""

from __future__ import annotations

import operator
import typing
from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

import torch

from cmcl.data.paired import PairedFeatures
from cmcl.errors import ConfigError
from cmcl.keyvalue import coerce
from cmcl.train.learners import ModalityLearners, PairOutput
from cmcl.train.objective import info_nce
from cmcl.types import StepInfo

Losses = dict[str, torch.Tensor]


def total_loss(losses: Losses) -> torch.Tensor:
    """What the trainer back-propagates: the sum of the terms whose key ends in ``_loss`` (other
    keys are logged only)."""
    return sum(v for k, v in losses.items() if k.endswith("_loss"))

Closure = Callable[[], tuple[Losses, PairOutput]]
_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def param(default: Any, **rule: Any) -> Any:
    """A hyperparameter field: its default and its constraint, any of the bounds ``ge``, ``gt``, ``le``,
    ``lt`` and ``choices``. The field's annotation is its type (``float | None`` also allows ``None``)."""
    return field(default=default, metadata=rule)


@dataclass(frozen=True)
class Params:
    """Hyperparameters of a strategy (none here); subclasses declare fields with :func:`param`."""


def make_params(strategy: str, cls: type[Params], values: Mapping[str, Any]) -> Params:
    """``cls`` from ``values`` (defaults for the rest), each coerced to its field's type
    (:func:`cmcl.keyvalue.coerce`) and checked against its constraint; a problem is one
    :class:`ConfigError` line naming the strategy."""
    declared = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        listing = ", ".join(f"{k}={f.default!r}" for k, f in declared.items()) or "none"
        raise ConfigError(f"strategy {strategy!r} has no parameter {', '.join(unknown)}; accepted: {listing}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _checked(strategy, f, hints[k], values.get(k, f.default)) for k, f in declared.items()})


def _checked(strategy: str, f: Field, hint: Any, value: Any) -> Any:
    kinds = typing.get_args(hint) or (hint,)
    if value is None and type(None) in kinds:
        return None
    try:
        if value is None:
            raise ValueError("cannot be none")
        value = coerce(value, kinds[0]())      # checked against the type's zero: False, 0, 0.0 or ""
    except ValueError as exc:
        raise ConfigError(f"strategy {strategy!r}: parameter {f.name} {exc}") from None
    choices, bounds = f.metadata.get("choices"), [(sym, op, f.metadata[k]) for k, (sym, op) in _BOUNDS.items()
                                                  if k in f.metadata]
    if (choices is None or value in choices) and all(op(value, b) for _, op, b in bounds):
        return value
    want = f"one of {', '.join(choices)}" if choices else " and ".join(f"{sym} {b}" for sym, _, b in bounds)
    raise ConfigError(f"strategy {strategy!r}: {f.name} must be {want} (default {f.default!r}), got {value!r}")


@dataclass(frozen=True)
class Objective:
    """The base contrastive loss with the run's settings (temperature, direction)."""

    temperature: float = 1.0
    direction: str = "a2b"

    def __call__(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return info_nce(u, v, temperature=self.temperature, direction=self.direction)


class Strategy:
    """Base class: plain sequential fine-tuning; every hook is a no-op or the identity.

    Subclasses set :attr:`name` (equal to their module stem), declare their hyperparameters in a
    nested ``Params`` dataclass (a subclass of their parent's), and override only the hooks they
    need. The constructor takes the hyperparameters as keywords, validates them with
    :func:`make_params` and sets each as an attribute (``self.params`` holds them all).
    """

    Params: ClassVar[type[Params]] = Params
    name: ClassVar[str] = ""
    #: Per-backbone overrides of hyperparameter defaults (e.g. DNS's ``lambda_min``).
    backbone_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Whether hooks read ``out.u.grad`` / ``out.v.grad`` (the trainer then retains them, two (B, d)
    #: copies per update); a strategy may set it per step in ``before_step``.
    output_grads: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = make_params(self.name, self.Params, params)
        vars(self).update({f.name: getattr(self.params, f.name) for f in fields(self.params)})

    def setup(self, learners: ModalityLearners, objective: Objective) -> None:
        """Called once before the first step; stores references."""
        self.learners = learners
        self.objective = objective

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        """Called before the optimizer of ``step`` is built."""

    def training_set(self, step: StepInfo, data: PairedFeatures) -> PairedFeatures:
        """The rows batched during ``step`` (default: the step's own data)."""
        return data

    def frozen(self, step: StepInfo) -> tuple[str, ...]:
        """Learners the trainer keeps out of autograd and of its optimizer during ``step``."""
        return ()

    def weight_grad_inputs(self, step: StepInfo) -> Mapping[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Per modality, a map of the inputs from which the trainer's backward computes the *weight*
        gradient during ``step`` (outputs and other gradients are unchanged): DNS's fused projection.
        Each map is row-wise (an output row depends on its input row only): the trainer applies it
        to all of the step's rows at once where memory allows (``trainer.weight_inputs``), or, for a
        :class:`~cmcl.train.learners.FactoredTransform`, its ``prepare`` part, and finishes each
        batch's rows from their prepared rows."""
        return {}

    def optimizer_groups(self, step: StepInfo) -> list[dict[str, Any]]:
        """Extra parameter groups the trainer's optimizer trains during ``step``: dicts with
        ``params`` and optionally ``lr`` and ``weight_decay``; not clipped, not scheduled."""
        return []

    def extra_inputs(self, batch: PairedFeatures) -> Mapping[str, torch.Tensor]:
        """Per modality, more input rows the trainer forwards with ``batch`` through that learner, in
        the same product (one weight-gradient product in the backward pass); their outputs arrive
        on ``out.extra`` in :meth:`losses`. Called once per evaluation of the batch: DER's replay."""
        return {}

    def losses(self, batch: PairedFeatures, out: PairOutput) -> Losses:
        """Loss terms of a batch; every key ends in ``_loss`` and the trainer sums them."""
        return {"contrastive_loss": self.objective(out.u, out.v)}

    def compute_gradients(self, closure: Closure) -> tuple[Losses, PairOutput]:
        """Fill ``.grad``; methods needing several evaluations call ``closure`` more than once."""
        return closure()

    def before_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        """After clipping, before ``optimizer.step()``: may edit ``.grad`` in place."""

    def after_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        """After ``optimizer.step()``."""

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        """After the last update of ``step``, before it is evaluated."""

    def report(self) -> dict[str, float]:
        """Scalars logged with the step's metrics (projector ranks, penalties...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume after the current step."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got keys {sorted(state)}")
