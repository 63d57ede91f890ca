"""CILA: λ_2 = 1, the worked example of baselines.md §9, the floor at 1, and the weighted loss."""

from __future__ import annotations

import pytest
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.cila import cila_coefficient
from cmcl.train.strategies.co2l import relation_distillation, stacked_unit
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

from tests.helpers import random_pairs

D = 8
ADAMW = Harness(lr=1e-2, weight_decay=1e-2, decay_bias=False, linear_decay=True, clip_norm=1.0)
STEPS = [("A", ("text", "audio")), ("B", ("vision", "text")), ("C", ("audio", "depth"))]


def pairs(n, seed, pair, step):
    return random_pairs(n, D, seed, pair, step)


def test_worked_example_and_rules():
    means = {2: (4.0, 2.0), 3: (4.0, 3.0)}          # j -> (L̄_con, L̄_dis)
    assert cila_coefficient(4, means, 5.0) == pytest.approx(3.125)
    assert cila_coefficient(4, means, 5.0, "pure") == pytest.approx(3.125)
    assert cila_coefficient(4, means, 5.0, "min") == 1.0
    # λ_2 = 1 whatever was logged; step 1 and steps >= t never count
    assert cila_coefficient(2, {1: (4.0, 100.0)}, 5.0) == 1.0
    assert cila_coefficient(4, means | {1: (1.0, 100.0), 4: (1.0, 100.0)}, 5.0) == pytest.approx(3.125)
    assert cila_coefficient(3, means, 5.0) == pytest.approx(2.5)
    # κ·ratio < 1 falls back to Co2L's weight 1 (and the "pure" variant does not)
    assert cila_coefficient(4, means, 0.5) == 1.0
    assert cila_coefficient(4, means, 0.5, "pure") == pytest.approx(0.3125)


def test_lambda_schedule_from_the_logged_means_of_a_run():
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "vision", "depth"], D)
    strategy = get_strategy("cila", buffer_size=12)
    strategy.setup(learners, Objective())
    frames, lambdas = [], []
    for i, (ds, pair) in enumerate(STEPS, start=1):
        res = fit_step(learners, strategy, StepInfo(i, ds, pair, 30 + i), pairs(36, i, pair, i),
                       harness=ADAMW, epochs=2, batch_size=16)
        frames.append(res.losses)
        lambdas.append(strategy.lam)
    assert lambdas[1] == 1.0
    assert strategy.report()["cila/lambda"] == lambdas[2]
    # step 2's raw means are the trainer's logged losses (λ_2 = 1, so ird_loss is raw there)
    con2, dis2 = strategy.means[2]
    assert con2 == pytest.approx(float(frames[1]["asym_loss"].mean()), rel=1e-5)
    assert dis2 == pytest.approx(float(frames[1]["ird_loss"].mean()), rel=1e-5)
    assert lambdas[2] == pytest.approx(max(1.0, 5.0 * dis2 / con2), rel=1e-6)
    assert lambdas[2] > 1.0
    assert 1 not in strategy.means
    # the state carries the means: a fresh strategy computes the same λ for a fourth step
    other = get_strategy("cila", buffer_size=12)
    other.setup(learners, Objective())
    other.load_state_dict(strategy.state_dict())
    other.before_step(StepInfo(4, "D", ("text", "audio"), 40), pairs(8, 4, ("text", "audio"), 4))
    con3, dis3 = strategy.means[3]
    assert other.lam == pytest.approx(max(1.0, 5.0 * (dis2 + dis3) / (con2 + con3)), rel=1e-6)


def test_training_loss_is_asym_plus_lambda_times_ird():
    torch.manual_seed(1)
    learners = ModalityLearners(["text", "audio", "vision"], D)
    strategy = get_strategy("cila")
    strategy.setup(learners, Objective())
    strategy.means = {2: (4.0, 2.0), 3: (4.0, 3.0)}
    strategy.before_step(StepInfo(4, "D", ("text", "audio"), 4), pairs(20, 4, ("text", "audio"), 4))
    assert strategy.lam == pytest.approx(3.125)
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = PairedFeatures.concat([pairs(10, 5, ("text", "audio"), 4), pairs(4, 6, ("vision", "text"), 2)])
    strategy._replay_rows = 4
    out = learners.forward_pairs(batch)
    losses = strategy.losses(batch, out)
    raw = relation_distillation(stacked_unit(out), strategy._teacher_targets(batch), strategy.kappa)
    assert float(raw.detach()) > 0
    torch.testing.assert_close(losses["ird_loss"], 3.125 * raw)
    assert set(losses) == {"asym_loss", "ird_loss"}
