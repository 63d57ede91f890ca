"""Co2L: Vanilla at step 1, the asymmetric loss, IRD's stationary point, the frozen teacher, the buffer."""

from __future__ import annotations

import numpy as np
import pytest
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
    space_contrastive_rows,
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


def test_ird_gradient_is_that_of_the_loss():
    # the closed-form backward (normalisation included) against finite differences in float64 and
    # against autograd of the normalised, masked log-softmax written out
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, D, generator=g, dtype=torch.float64).requires_grad_(True)
    targets = relation_targets(torch.nn.functional.normalize(torch.randn(7, D, generator=g, dtype=torch.float64),
                                                             dim=1), 0.05)
    assert torch.autograd.gradcheck(lambda a: relation_distillation(a, targets, 0.2), (x,))
    z = torch.nn.functional.normalize(x, dim=1)
    eye = torch.eye(7, dtype=torch.bool)
    explicit = -(targets * torch.log_softmax((z @ z.T / 0.2).masked_fill(eye, float("-inf")), dim=1)
                 .masked_fill(eye, 0.0)).sum(dim=1).mean()
    (want,) = torch.autograd.grad(3.0 * explicit, x)
    (got,) = torch.autograd.grad(3.0 * relation_distillation(x, targets, 0.2), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(relation_distillation(x, targets, 0.2), explicit, rtol=1e-14, atol=0)


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


# ---------------------------------------------------------------- replay that protects old pairs
# A step (text, audio) whose batch holds buffered pairs of other modality pairs (the erratum to
# baselines.md §7 item 3): an a-anchor may only meet outputs of modality b.
MIXED_A = np.array(["text", "text", "text", "text", "audio", "video", "depth", "text", "vision"])
MIXED_B = np.array(["audio", "audio", "audio", "video", "text", "audio", "vision", "audio", "audio"])
MIXED_CURRENT = torch.tensor([True, True, True, False, False, False, False, False, False])


def _mixed_outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(MIXED_A)
    return (torch.randn(n, D, generator=g).requires_grad_(True),
            torch.randn(n, D, generator=g).requires_grad_(True))


def _output_modalities():
    return np.concatenate([MIXED_A, MIXED_B])     # of the stacked outputs [u; v]


@pytest.mark.parametrize("replay", ["same_space", "own_pair"])
@pytest.mark.parametrize("direction", ["a2b", "symmetric"])
def test_no_output_outside_b_is_a_negative_of_an_a_anchor(replay, direction):
    """Property: the a→b loss of the current (text, audio) anchors has zero gradient on every output of a
    modality other than audio, apart from the anchors themselves (b→a: other than text, apart from v_i)."""
    u, v = _mixed_outputs()
    anchors = MIXED_CURRENT if replay == "same_space" else torch.ones(len(MIXED_A), dtype=torch.bool)
    rows = space_contrastive_rows(u, v, MIXED_A, MIXED_B, anchors, direction=direction)
    # the loss terms of the current step's anchors only (own_pair adds buffered anchors' own terms)
    gu, gv = torch.autograd.grad(rows[MIXED_CURRENT].sum(), [u, v])
    grads = torch.cat([gu, gv]).abs().sum(dim=1)
    mods = _output_modalities()
    n = len(MIXED_A)
    is_anchor = np.zeros(2 * n, dtype=bool)
    is_anchor[:3] = True                                  # current u_i (text)
    if direction == "symmetric":
        is_anchor[n:n + 3] = True                         # current v_i (audio) anchor the b→a term
    allowed = (mods == "audio") | is_anchor
    if direction == "symmetric":
        allowed |= mods == "text"                         # negatives of the b→a term live in a's space
    assert float(grads[torch.as_tensor(~allowed)].abs().max()) == 0.0
    # and b-space outputs of buffered rows do act as negatives: v of the buffered (text, audio) and
    # (video, audio) rows, u of the buffered (audio, text) row
    for k in (n + 7, n + 5, 4):
        assert float(grads[k]) > 0.0, k
    if direction == "a2b":
        # the a→b loss never touches a text output other than the anchors (text is not b's space)
        assert float(grads[torch.as_tensor((mods == "text") & ~is_anchor)].max()) == 0.0


def test_same_space_loss_matches_an_explicit_candidate_set_and_is_infonce_without_replay():
    u, v = _mixed_outputs(1)
    rows = space_contrastive_rows(u, v, MIXED_A, MIXED_B, MIXED_CURRENT)
    n = len(MIXED_A)
    z, mods = torch.cat([v, u]), np.concatenate([MIXED_B, MIXED_A])
    for i in range(3):
        cand = [j for j in range(2 * n) if mods[j] == "audio" and j != n + i]
        logits = u[i] @ z[cand].T
        expected = -(logits[cand.index(i)] - torch.logsumexp(logits, 0))
        torch.testing.assert_close(rows[i], expected)
    assert torch.equal(rows[3:], torch.zeros(n - 3))
    # a batch of current rows only: exactly the run's InfoNCE (both directions)
    cur = np.array(["text"] * 5), np.array(["audio"] * 5)
    ones = torch.ones(5, dtype=torch.bool)
    for direction in ("a2b", "symmetric"):
        got = space_contrastive_rows(u[:5], v[:5], *cur, ones, direction=direction).mean()
        torch.testing.assert_close(got, Objective(direction=direction)(u[:5], v[:5]), rtol=1e-6, atol=1e-7)


def test_own_pair_anchors_buffered_pairs_in_their_own_space():
    u, v = _mixed_outputs(2)
    rows = space_contrastive_rows(u, v, MIXED_A, MIXED_B, torch.ones(len(MIXED_A), dtype=torch.bool))
    n = len(MIXED_A)
    # row 6 is a buffered (depth, vision) pair: its vision candidates are v_6 and u_8 (a vision output)
    logits6 = torch.stack([u[6] @ v[6], u[6] @ u[8]])
    torch.testing.assert_close(rows[6], -torch.log_softmax(logits6, 0)[0])
    # row 3, a buffered (text, video) pair, is scored against the video outputs: v_3 and u_5
    logits = torch.stack([u[3] @ v[3], u[3] @ u[5]])
    torch.testing.assert_close(rows[3], -torch.log_softmax(logits, 0)[0])
    # the current anchors' terms are those of same_space
    same = space_contrastive_rows(u, v, MIXED_A, MIXED_B, MIXED_CURRENT)
    torch.testing.assert_close(rows[:3], same[:3])
    assert n == 9


@pytest.mark.parametrize("name", ["co2l", "cflat", "cila"])
def test_replay_never_trains_against_other_pairs_alignments(name):
    """Through the strategy: with IRD off, a (text, audio) step whose buffer holds (text, video) and
    (depth, vision) pairs gives the video, depth and vision learners no gradient at all."""
    learners = jittered_learners()
    params = {"distill_power": 0.0} if name != "cila" else {"balance": 0.0}
    strategy = get_strategy(name, **params)
    strategy.setup(learners, Objective())
    strategy.buffer.fill_balanced(PairedFeatures.concat([pairs(12, 3, ("text", "video"), 1),
                                                         pairs(12, 4, ("depth", "vision"), 2)]),
                                  2, torch.Generator().manual_seed(0))
    step = StepInfo(3, "C", ("text", "audio"), 7)
    data = pairs(20, 5, ("text", "audio"), 3)
    strategy.before_step(step, data)
    train = strategy.training_set(step, data)
    learners.zero_grad(set_to_none=True)
    out = learners.forward_pairs(train)
    losses = strategy.losses(train, out)
    losses["asym_loss"].backward()
    for m in ("video", "depth", "vision"):
        assert learners[m].weight.grad is None or float(learners[m].weight.grad.abs().max()) == 0.0, m
    assert float(learners["audio"].weight.grad.abs().max()) > 0.0
    # the superseded mapping did train them (the erratum's failure mode)
    old = get_strategy("co2l", distill_power=0.0, replay="all_rows")
    old.setup(learners, Objective())
    old.buffer = strategy.buffer
    old.before_step(step, data)
    train = old.training_set(step, data)
    learners.zero_grad(set_to_none=True)
    old.losses(train, learners.forward_pairs(train))["asym_loss"].backward()
    assert float(learners["video"].weight.grad.abs().max()) > 0.0
