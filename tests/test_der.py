"""DER and DER++: stored scores come from the pre-update forward pass, the distillation and
ground-truth terms, independent draws, beta = 0 equals DER, and the per-backbone beta."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.objective import info_nce
from cmcl.train.strategies import get_strategy, resolve_params
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

D = 6
HARNESS = Harness(lr=5e-2, weight_decay=0.0, decay_bias=False, linear_decay=False, clip_norm=None)


def pairs(n, seed, pair, step):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    y = x @ rng.standard_normal((D, D)) + 0.5 * rng.standard_normal((n, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return PairedFeatures.from_arrays(x.astype(np.float32), y.astype(np.float32), pair, step,
                                      ids=np.array([f"{step}-{i}" for i in range(n)]))


def scores(learners, data, temperature=1.0):
    with torch.no_grad():
        out = learners.forward_pairs(data)
        return (out.u * out.v).sum(1) / temperature


def trained(name, steps=2, **params):
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "video"], D)
    strategy = get_strategy(name, **params)
    strategy.setup(learners, Objective())
    for i, pair in enumerate([("text", "audio"), ("audio", "video")][:steps], start=1):
        fit_step(learners, strategy, StepInfo(i, f"s{i}", pair, 20 + i), pairs(40, i, pair, i),
                 harness=HARNESS, epochs=2, batch_size=16)
    return learners, strategy


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_stored_scores_are_those_of_the_pre_update_forward_pass(temperature):
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio"], D)
    der = get_strategy("der", buffer_size=200)           # keeps every offer, in offer order
    der.setup(learners, Objective(temperature))
    expected, post = [], []
    original_gradients, original_after = der.compute_gradients, der.after_update

    def spy_gradients(closure):
        snapshot = copy.deepcopy(learners)               # parameters before this update
        losses, out = original_gradients(closure)
        spy_gradients.snapshot = snapshot
        return losses, out

    def spy_after(batch, out):
        expected.append(scores(spy_gradients.snapshot, batch, temperature))
        post.append(scores(learners, batch, temperature))
        original_after(batch, out)

    der.compute_gradients, der.after_update = spy_gradients, spy_after
    data = pairs(48, 1, ("text", "audio"), 1)
    fit_step(learners, der, StepInfo(1, "s1", ("text", "audio"), 7), data, harness=HARNESS, epochs=2, batch_size=16)
    stored = der.buffer.extras["score"]
    assert len(der.buffer) == der.buffer.offers == 96
    torch.testing.assert_close(stored, torch.cat(expected), rtol=1e-6, atol=1e-7)
    assert (stored - torch.cat(post)).abs().max() > 1e-3      # the update moved the scores


def test_der_term_is_the_score_distillation_and_vanishes_at_the_storing_parameters():
    learners, der = trained("der", steps=1, alpha=0.3)
    batch = pairs(16, 5, ("text", "audio"), 2)
    gen = der._gens["replay"]
    state = gen.get_state()
    losses = der.losses(batch, learners.forward_pairs(batch))
    gen.set_state(state)
    replay, extras = der.buffer.sample(der.replay_batch, gen)
    want = 0.3 * (scores(learners, replay) - extras["score"]).pow(2).mean()
    torch.testing.assert_close(losses["der_loss"].detach(), want, rtol=1e-5, atol=1e-9)
    assert float(want) > 0
    # re-scored under the parameters they were stored with, the penalty is zero (to rounding)
    fresh = get_strategy("der", buffer_size=64)
    fresh.setup(learners, Objective())
    fresh.before_step(StepInfo(3, "s3", ("text", "audio"), 9), batch)
    out = learners.forward_pairs(batch)
    fresh.after_update(batch, out)
    losses = fresh.losses(batch, out)
    assert float(losses["der_loss"].detach()) < 1e-12
    assert set(losses) == {"contrastive_loss", "der_loss"}


@pytest.mark.parametrize("name", ["der", "derpp"])
def test_joint_backward_gives_the_plain_gradient(name):
    learners, strategy = trained(name, steps=2, beta=0.5) if name == "derpp" else trained(name, steps=2)
    batch = pairs(16, 7, ("audio", "video"), 2)
    states = {k: g.get_state() for k, g in strategy._gens.items()}
    learners.zero_grad(set_to_none=True)
    losses = strategy.losses(batch, learners.forward_pairs(batch, strategy.extra_inputs(batch)))   # as the trainer
    sum(losses.values()).backward()
    joint = {n: p.grad.clone() for n, p in learners.named_parameters() if p.grad is not None}
    # the same terms written plainly: base loss on the trainer's outputs, replay scored separately
    for k, g in strategy._gens.items():
        g.set_state(states[k])
    learners.zero_grad(set_to_none=True)
    out = learners.forward_pairs(batch)
    idx = strategy._draw(strategy._gens["replay"])
    plain = info_nce(out.u, out.v) + strategy.alpha * (
        strategy.replay_scores(idx) - strategy.buffer.extras["score"][idx]).pow(2).mean()
    if name == "derpp":
        plain = plain + strategy.beta * F.softplus(-strategy.replay_scores(strategy._draw(strategy._gens["gt"]))).mean()
    torch.testing.assert_close(sum(losses.values()).detach(), plain.detach(), rtol=1e-6, atol=1e-7)
    plain.backward()
    assert set(joint) == {n for n, p in learners.named_parameters() if p.grad is not None}
    for n, p in learners.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(joint[n], p.grad, rtol=1e-5, atol=1e-7)


def test_derpp_ground_truth_term_raises_the_matched_scores_on_an_independent_draw():
    learners, derpp = trained("derpp", steps=1, beta=0.5)
    batch = pairs(16, 5, ("text", "audio"), 2)
    replay_state, gt_state = derpp._gens["replay"].get_state(), derpp._gens["gt"].get_state()
    learners.zero_grad(set_to_none=True)
    losses = derpp.losses(batch, learners.forward_pairs(batch))
    first = derpp.buffer.sample(derpp.replay_batch, torch.Generator().set_state(replay_state))[0]
    second = derpp.buffer.sample(derpp.replay_batch, torch.Generator().set_state(gt_state))[0]
    assert set(first.ids.tolist()) != set(second.ids.tolist())
    s = scores(learners, second)
    torch.testing.assert_close(losses["gt_loss"].detach(), 0.5 * F.softplus(-s).mean(), rtol=1e-5, atol=1e-9)
    # one gradient step on the ground-truth term alone raises the drawn pairs' scores
    losses["gt_loss"].backward()
    with torch.no_grad():
        for p in learners.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    assert float(scores(learners, second).mean()) > float(s.mean())


def test_derpp_with_beta_zero_is_der_and_beta_changes_it():
    final = {}
    for label, name, params in (("der", "der", {}), ("pp0", "derpp", {"beta": 0.0}), ("pp", "derpp", {"beta": 0.5})):
        learners, _ = trained(name, **params)
        final[label] = torch.cat([p.detach().flatten() for p in learners.parameters()])
    assert torch.equal(final["der"], final["pp0"])
    assert not torch.equal(final["der"], final["pp"])


def test_buffer_mixes_steps_and_reports_its_composition():
    learners, der = trained("der", buffer_size=32)
    report = der.report()
    assert report["buffer/size"] == 32 and report["buffer/offers"] == 160
    assert report["buffer/step_1"] + report["buffer/step_2"] == 32 and report["buffer/step_1"] > 0
    # replay trained the learners of step 1's pair too, each row through its own modalities
    assert set(der.buffer.features().ma.tolist()) == {"text", "audio"}


@pytest.mark.parametrize("name", ["der", "derpp"])
def test_replay_trains_only_the_current_pair(name):
    learners, strategy = trained(name, steps=1, buffer_size=32)
    text = [p.detach().clone() for p in learners["text"].parameters()]
    step2 = StepInfo(2, "s2", ("audio", "video"), 22)
    batch = pairs(16, 2, ("audio", "video"), 2)
    strategy.before_step(step2, batch)
    learners.zero_grad(set_to_none=True)
    losses = strategy.losses(batch, learners.forward_pairs(batch))
    assert float(losses["der_loss"].detach()) > 0      # step-1 (text, audio) pairs replayed
    sum(losses.values()).backward()
    assert all(p.grad is None for p in learners["text"].parameters())
    assert learners["audio"].weight.grad is not None
    fit_step(learners, strategy, step2, pairs(40, 2, ("audio", "video"), 2), harness=HARNESS, epochs=1,
             batch_size=16)
    assert all(torch.equal(p, q) for p, q in zip(learners["text"].parameters(), text))


def test_derpp_beta_follows_the_backbone():
    assert resolve_params("derpp", {}, "languagebind")["beta"] == 0.1
    assert resolve_params("derpp", {}, "imagebind")["beta"] == 0.001
    assert resolve_params("derpp", {"beta": 0.2}, "languagebind")["beta"] == 0.2
    assert resolve_params("der", {}, "languagebind") == {"alpha": 0.1, "buffer_size": 256, "replay_batch": 64}


def test_a_stored_score_depends_only_on_its_own_pairs_learners():
    """The replay principle of the erratum to baselines.md §7: DER never scores a stored row against a
    row of another pair, so a stored (text, audio) score has no gradient on the video learner, etc."""
    learners, der = trained("der", steps=2)
    der._cache_frozen({"text", "audio", "video"})       # every learner trainable: nothing cached
    feats = der.buffer.features()
    assert {tuple(p) for p in zip(feats.ma, feats.mb)} == {("text", "audio"), ("audio", "video")}
    idx = torch.arange(len(der.buffer))
    s = der.replay_scores(idx)
    weights = {m: learners[m].weight for m in ("text", "audio", "video")}
    for r in range(0, len(idx), 7):
        grads = torch.autograd.grad(s[r], list(weights.values()), retain_graph=True, allow_unused=True)
        touched = {m for m, g in zip(weights, grads) if g is not None and float(g.abs().max()) > 0}
        assert touched == {str(feats.ma[r]), str(feats.mb[r])}, r
