"""GNSP: the projection keeps old inputs' outputs fixed under gradient descent; its extra losses vanish
where they should; the data matrix follows the source's accumulation rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.gnsp import data_matrix
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

from tests.test_dns import generic_pairs, low_rank_pairs

D = 12
SGD = Harness(lr=0.5, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=None, optimizer="sgd")


def _setup(name, **params):
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "video"], D)
    strategy = get_strategy(name, **params)
    strategy.setup(learners, Objective())
    return learners, strategy


def _outputs(learners, m, x):
    with torch.no_grad():
        return learners(m, torch.as_tensor(x))


@pytest.mark.parametrize("extra", [{"distill": 0.0, "map": 0.0}, {}])
def test_projection_keeps_old_inputs_outputs_fixed_under_sgd(extra):
    """Step 1 on low-rank (text, audio) data, step 2 (text, video): text's outputs of step-1 inputs stay
    put under plain gradient descent (the whole loss is projected, KD and MAP included), vanilla's move."""
    changes = {}
    for name, params in (("gnsp", {"rho": 1e-6, **extra}), ("vanilla", {})):
        learners, strategy = _setup(name, **params)
        xa1, xb1 = low_rank_pairs(1)
        fit_step(learners, strategy, StepInfo(1, "A", ("text", "audio"), 11),
                 PairedFeatures.from_arrays(xa1, xb1, ("text", "audio"), 1), harness=SGD, epochs=3, batch_size=32)
        before = _outputs(learners, "text", xa1)
        xa2, xb2 = generic_pairs(2)
        fit_step(learners, strategy, StepInfo(2, "B", ("text", "video"), 22),
                 PairedFeatures.from_arrays(xa2, xb2, ("text", "video"), 2), harness=SGD, epochs=2, batch_size=32)
        changes[name] = float(torch.linalg.norm(_outputs(learners, "text", xa1) - before))
        if name == "gnsp":
            assert strategy.report()["gnsp/rank/text"] == 4.0        # the span of step 1's rank-4 inputs
            assert strategy.report()["gnsp/rank/video"] == 0.0       # never trained: not projected
            # and the step learned something: text's outputs of the new inputs moved
            assert float(torch.linalg.norm(learners["text"].weight.detach() - torch.eye(D))) > 1e-2
    assert changes["vanilla"] > 1e-2
    assert changes["gnsp"] < 1e-5


def test_biases_are_frozen_by_default_and_train_with_the_option():
    for train_bias in (False, True):
        learners, strategy = _setup("gnsp", train_bias=train_bias)
        xa, xb = generic_pairs(3)
        fit_step(learners, strategy, StepInfo(1, "A", ("text", "audio"), 1),
                 PairedFeatures.from_arrays(xa, xb, ("text", "audio"), 1), harness=SGD, epochs=1, batch_size=32)
        moved = float(learners["text"].bias.detach().abs().max())
        assert (moved > 0) == train_bias


def test_without_extra_losses_or_history_a_step_is_vanilla_exactly():
    """distill = map = 0 on a first step (nothing to project), biases trained: bit-identical to vanilla."""
    finals = {}
    for name, params in (("gnsp", {"distill": 0.0, "map": 0.0, "train_bias": True}), ("vanilla", {})):
        learners, strategy = _setup(name, **params)
        xa, xb = generic_pairs(4)
        fit_step(learners, strategy, StepInfo(1, "A", ("text", "audio"), 1),
                 PairedFeatures.from_arrays(xa, xb, ("text", "audio"), 1),
                 harness=Harness(lr=1e-2, weight_decay=1e-2, decay_bias=False, linear_decay=True, clip_norm=1.0), epochs=2, batch_size=16)
        finals[name] = torch.cat([p.detach().flatten() for p in learners.parameters()])
    assert torch.equal(finals["gnsp"], finals["vanilla"])


def test_distillation_gradient_vanishes_where_student_equals_teacher():
    """At identity learners the student is the initial teacher: the KD term is stationary (its value is
    the teacher's entropy, not 0); away from it, the gradient is not zero."""
    learners, strategy = _setup("gnsp")
    xa, xb = generic_pairs(5, n=20)
    ref = PairedFeatures.from_arrays(xa, xb, ("text", "audio"), 1)
    kd, _ = strategy.reference_losses(ref)
    grads = torch.autograd.grad(kd, [learners["text"].weight, learners["audio"].weight])
    assert max(float(g.abs().max()) for g in grads) < 1e-6
    with torch.no_grad():
        learners["text"].weight.add_(0.3 * torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    kd, _ = strategy.reference_losses(ref)
    grads = torch.autograd.grad(kd, [learners["text"].weight])
    assert float(grads[0].abs().max()) > 1e-4


def test_reference_losses_match_the_closed_forms():
    learners, strategy = _setup("gnsp", logit_scale=10.0, teacher="previous")
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    xa, xb = generic_pairs(6, n=7)
    ref = PairedFeatures.from_arrays(xa, xb, ("text", "audio"), 1)
    strategy.before_step(StepInfo(1, "A", ("text", "audio"), 3), ref)
    with torch.no_grad():
        learners["audio"].weight.mul_(1.5)               # the student drifts away from its teacher
    kd, align = strategy.reference_losses(ref)
    x, y = torch.as_tensor(xa, dtype=torch.float64), torch.as_tensor(xb, dtype=torch.float64)

    def logits(wa, ba, wb, bb):
        u, v = x @ wa.double().T + ba.double(), y @ wb.double().T + bb.double()
        return 10.0 * F.normalize(u, dim=1) @ F.normalize(v, dim=1).T

    ta, tb = strategy._teacher["text"], strategy._teacher["audio"]
    t = logits(ta.weight, ta.bias, tb.weight, tb.bias)
    la, lb = learners["text"], learners["audio"]
    s = logits(la.weight.detach(), la.bias.detach(), lb.weight.detach(), lb.bias.detach())

    def soft_ce(student, teacher):                     # T² · mean_i Σ_j −p_ij log q_ij, T = 2
        p = torch.softmax(teacher / 2, dim=1)
        return 4.0 * -(p * torch.log_softmax(student / 2, dim=1)).sum(1).mean()

    def smoothed_ce(z):                                 # label smoothing 0.2 over n = 7 classes
        target = torch.full((7, 7), 0.2 / 7, dtype=torch.float64) + 0.8 * torch.eye(7, dtype=torch.float64)
        return -(target * torch.log_softmax(z, dim=1)).sum(1).mean()

    torch.testing.assert_close(kd.double(), soft_ce(s, t) + soft_ce(s.T, t.T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(align.double(), smoothed_ce(s) + smoothed_ce(s.T), rtol=1e-5, atol=1e-5)


def test_data_matrix_follows_the_sources_accumulation_rules():
    rng = np.random.default_rng(0)
    x1 = torch.as_tensor(rng.standard_normal((40, D)), dtype=torch.float32)
    x2 = torch.as_tensor(rng.standard_normal((24, D)), dtype=torch.float32)

    def by_hand(x, chunk=16):
        total = torch.zeros(D, D, dtype=torch.float64)
        for lo in range(0, len(x), chunk):
            g = x[lo:lo + chunk].double().T @ x[lo:lo + chunk].double()
            total += g / torch.linalg.matrix_norm(g)
        return total / torch.linalg.matrix_norm(total)

    torch.testing.assert_close(data_matrix(x1, 16) / torch.linalg.matrix_norm(data_matrix(x1, 16)), by_hand(x1))
    for rule in ("proj", "sum"):
        learners, strategy = _setup("gnsp", accumulate=rule)
        y1, y2 = torch.randn(40, D), torch.randn(24, D)
        strategy.after_step(StepInfo(1, "A", ("text", "audio"), 0), PairedFeatures.from_arrays(x1, y1, ("text", "audio"), 1))
        strategy.after_step(StepInfo(2, "B", ("text", "video"), 0), PairedFeatures.from_arrays(x2, y2, ("text", "video"), 2))
        m1, m2 = by_hand(x1), by_hand(x2)
        # proj: M ← M/‖M‖ + M_new (the first M already has unit norm, so both rules agree after two steps)
        torch.testing.assert_close(strategy.matrices["text"], m1 + m2)
        x3 = torch.randn(30, D)
        strategy.after_step(StepInfo(3, "C", ("text", "audio"), 0),
                            PairedFeatures.from_arrays(x3, torch.randn(30, D), ("text", "audio"), 3))
        m3 = by_hand(x3)
        expected = (m1 + m2) / torch.linalg.matrix_norm(m1 + m2) + m3 if rule == "proj" else m1 + m2 + m3
        torch.testing.assert_close(strategy.matrices["text"], expected)


def test_rank_keeps_the_fewest_directions_holding_one_minus_rho_of_the_mass():
    learners, strategy = _setup("gnsp", rho=0.15)
    # eigenvalues 0.5, 0.3, 0.1, 0.1 (+ zeros): 0.8 < 0.85 ≤ 0.9, so k = 3
    basis = torch.linalg.qr(torch.randn(D, 4, generator=torch.Generator().manual_seed(3)))[0].double()
    strategy.matrices["text"] = basis @ torch.diag(torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)) @ basis.T
    strategy.before_step(StepInfo(2, "B", ("text", "audio"), 0), PairedFeatures.from_arrays(
        *generic_pairs(7, n=8), ("text", "audio"), 2))
    assert strategy.report()["gnsp/rank/text"] == 3.0
    assert strategy.report()["gnsp/rank/audio"] == 0.0
