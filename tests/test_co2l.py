"""Co2L: Vanilla at step 1, the asymmetric loss, IRD's stationary point, the frozen teacher, the buffer."""

from __future__ import annotations

import numpy as np
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.co2l import (
    asymmetric_contrastive,
    relation_distillation,
    relation_targets,
    stacked_unit,
)
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

from tests.helpers import random_pairs

D = 8
ADAMW = Harness(lr=1e-2, weight_decay=1e-2, decay_bias=False, linear_decay=True, clip_norm=1.0)
MODALITIES = ["text", "audio", "vision", "depth", "video"]


def pairs(n, seed, pair, step):
    return random_pairs(n, D, seed, pair, step)


def jittered_learners(seed=0):
    torch.manual_seed(seed)
    learners = ModalityLearners(MODALITIES, D)
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return learners


def flat(learners):
    return torch.cat([p.detach().flatten() for p in learners.parameters()])


def test_step_one_with_an_empty_buffer_is_vanilla():
    results = {}
    for name in ("vanilla", "co2l"):
        learners = jittered_learners()
        strategy = get_strategy(name)
        strategy.setup(learners, Objective())
        res = fit_step(learners, strategy, StepInfo(1, "A", ("text", "audio"), 5), pairs(50, 1, ("text", "audio"), 1),
                       harness=ADAMW, epochs=2, batch_size=16)
        results[name] = (flat(learners), res.losses)
    assert torch.equal(results["vanilla"][0], results["co2l"][0])
    np.testing.assert_array_equal(results["vanilla"][1]["contrastive_loss"], results["co2l"][1]["asym_loss"])
    assert "ird_loss" not in results["co2l"][1]


def test_asymmetric_loss_uses_buffered_rows_as_negatives_only():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
    current = torch.tensor([True, True, False, True, False, True])
    loss = asymmetric_contrastive(u, v, current)
    logits = u @ v.T
    rows = [i for i in range(6) if current[i]]
    expected = -sum(torch.log_softmax(logits[i], 0)[i] for i in rows) / len(rows)
    torch.testing.assert_close(loss, expected)
    # a buffered pair's anchor side does not enter, its other side is a negative
    u2 = u.clone()
    u2[2] += 5.0
    assert torch.equal(asymmetric_contrastive(u2, v, current), loss)
    v2 = v.clone()
    v2[2] += 5.0
    assert not torch.allclose(asymmetric_contrastive(u, v2, current), loss)
    # all rows current: the plain InfoNCE; no current row: 0
    torch.testing.assert_close(asymmetric_contrastive(u, v, torch.ones(6, dtype=torch.bool)),
                               Objective()(u, v), rtol=1e-6, atol=1e-7)
    assert float(asymmetric_contrastive(u, v, torch.zeros(6, dtype=torch.bool))) == 0.0


def test_ird_matches_an_explicit_sum_over_the_off_diagonal():
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(5, D, generator=g), dim=1)
    zt = torch.nn.functional.normalize(torch.randn(5, D, generator=g), dim=1)
    kappa, kappa_past = 0.2, 0.05
    total = 0.0
    for r in range(5):
        others = [s for s in range(5) if s != r]
        p = torch.softmax(torch.stack([z[r] @ z[s] / kappa for s in others]), 0)
        pt = torch.softmax(torch.stack([zt[r] @ zt[s] / kappa_past for s in others]), 0)
        total += float(-(pt * p.log()).sum())
    got = relation_distillation(z, relation_targets(zt, kappa_past), kappa)
    assert abs(float(got) - total / 5) < 1e-5


def _ird_gradient(kappa, kappa_past):
    learners = jittered_learners(3)
    strategy = get_strategy("co2l", kappa=kappa, kappa_past=kappa_past)
    strategy.setup(learners, Objective())
    strategy.before_step(StepInfo(2, "B", ("text", "audio"), 7), pairs(10, 2, ("text", "audio"), 2))
    batch = PairedFeatures.concat([pairs(6, 4, ("text", "audio"), 2), pairs(4, 5, ("vision", "depth"), 1)])
    learners.zero_grad(set_to_none=True)
    ird = relation_distillation(stacked_unit(learners.forward_pairs(batch)), strategy._teacher_targets(batch), kappa)
    ird.backward()
    return torch.cat([p.grad.flatten() for m in ("text", "audio", "vision", "depth") for p in learners[m].parameters()])


def test_ird_is_stationary_where_student_equals_teacher_with_equal_temperatures():
    assert _ird_gradient(0.2, 0.2).abs().max() < 1e-6
    assert _ird_gradient(0.2, 0.01).abs().max() > 1e-3


def _two_steps(strategy, learners, checks=None, epochs=2):
    data1 = pairs(40, 1, ("vision", "depth"), 1)
    fit_step(learners, strategy, StepInfo(1, "A", ("vision", "depth"), 11), data1, harness=ADAMW,
             epochs=epochs, batch_size=16)
    report1 = strategy.report()
    data2 = pairs(40, 2, ("text", "audio"), 2)
    res = fit_step(learners, strategy, StepInfo(2, "B", ("text", "audio"), 12), data2, harness=ADAMW,
                   epochs=epochs, batch_size=16)
    return report1, res


def test_teacher_is_frozen_during_the_step_and_the_buffer_is_merged():
    learners = jittered_learners()
    strategy = get_strategy("co2l", buffer_size=10)
    strategy.setup(learners, Objective())
    seen = {}
    original = strategy.losses

    def spy(batch, out):
        if strategy.teacher is not None:
            seen.setdefault("start", flat(strategy.teacher))
            assert torch.equal(flat(strategy.teacher), seen["start"])
            assert all(p.grad is None and not p.requires_grad for p in strategy.teacher.parameters())
            seen.setdefault("replayed", set()).update(batch.ma[batch.step.numpy() == 1].tolist())
        return original(batch, out)

    strategy.losses = spy
    report1, res = _two_steps(strategy, learners)
    assert report1 == {"co2l/replay_rows": 0.0, "co2l/asym_loss": report1["co2l/asym_loss"], "co2l/buffer/step01": 10.0}
    assert seen["replayed"] == {"vision"}          # buffered rows keep their own modalities
    report2 = strategy.report()
    assert report2["co2l/replay_rows"] == 10.0
    assert report2["co2l/buffer/step01"] == 5.0 and report2["co2l/buffer/step02"] == 5.0
    # 40 current + 10 buffered rows in batches of 16: 4 updates per epoch
    assert len(res.losses) == 8 and {"asym_loss", "ird_loss"} <= set(res.losses.columns)
    assert abs(report2["co2l/ird_loss"] - float(res.losses["ird_loss"].mean())) < 1e-5
    # the snapshot was the learners at the start of step 2, not the initial ones
    assert not torch.equal(seen["start"], flat(jittered_learners()))


def test_precomputed_teacher_outputs_match_the_frozen_teacher():
    learners = jittered_learners(2)
    strategy = get_strategy("co2l", buffer_size=6)
    strategy.setup(learners, Objective())
    step1 = StepInfo(1, "A", ("vision", "depth"), 1)
    strategy.before_step(step1, pairs(20, 1, ("vision", "depth"), 1))
    strategy.after_step(step1, pairs(20, 1, ("vision", "depth"), 1))
    step2 = StepInfo(2, "B", ("text", "audio"), 2)
    data = pairs(30, 2, ("text", "audio"), 2)
    strategy.before_step(step2, data)
    train = strategy.training_set(step2, data)
    assert len(train) == 36
    batch = train.select(torch.tensor([35, 3, 31, 0, 7, 33]))        # mixed pairs, any order
    assert batch.row.tolist() == [35, 3, 31, 0, 7, 33]
    plain = PairedFeatures(batch.xa, batch.xb, batch.ma, batch.mb, batch.step, batch.labels, batch.ids)
    with torch.no_grad():
        direct = relation_targets(stacked_unit(strategy.teacher.forward_pairs(plain)), strategy.kappa_past)
    torch.testing.assert_close(strategy._teacher_targets(batch), direct, rtol=1e-5, atol=1e-6)
    assert torch.equal(strategy._teacher_targets(plain), direct)
