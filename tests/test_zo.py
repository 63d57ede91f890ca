"""ZO: the two-point estimate is unbiased, the ZO learner never takes an autograd gradient, the
conservative rule never raises the batch loss, the side rule, determinism and the controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.data.protocol import load_protocol
from cmcl.train.config import Harness
from cmcl.train.objective import info_nce
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.zo import rule_side
from cmcl.train.trainer import build_optimizer, fit_step
from cmcl.types import StepInfo

from tests.helpers import perturbed_learners

ADAM = Harness(lr=1e-2, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)


def pairs(n, d, seed, pair=("text", "audio"), dtype=np.float32, scale_b=1.0):
    rng = np.random.default_rng(seed)
    xa = rng.standard_normal((n, d))
    xb = xa + 0.7 * rng.standard_normal((n, d))
    xa /= np.linalg.norm(xa, axis=1, keepdims=True)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    data = PairedFeatures.from_arrays(xa, xb * scale_b, pair, 1)
    data.xa, data.xb = data.xa.to(getattr(torch, np.dtype(dtype).name)), data.xb.to(getattr(torch, np.dtype(dtype).name))
    return data


def make(d=4, pair=("text", "audio"), dtype=torch.float32, seed=5, **params):
    learners = perturbed_learners(["text", "audio", "video", "vision"], d, 0.3, dtype)
    zo = get_strategy("zo", **params)
    zo.setup(learners, Objective())
    return learners, zo


def test_two_point_estimate_is_unbiased_and_sign_estimate_points_along_the_gradient():
    learners, zo = make(dtype=torch.float64, eps=1e-6)
    data = pairs(8, 4, 0, dtype=np.float64)
    zo.before_step(StepInfo(1, "toy", ("text", "audio"), 3), data)
    assert zo._zo == ("text",)
    w, b = learners["text"].weight, learners["text"].bias
    wr, br = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    v = learners["audio"](data.xb).detach()
    info_nce(F.linear(data.xa, wr, br), v).backward()
    grad = torch.cat([wr.grad.flatten(), br.grad])
    y = {"a": learners["text"](data.xa).detach(), "b": v}
    n = 20000
    raw = torch.zeros_like(grad)
    signed = torch.zeros_like(grad)
    for _ in range(n // 2000):
        c, sz, _ = zo.estimate(data.xa, data.xb, y, ("text",), draws=2000)
        z = torch.cat([sz["text"][0].flatten(1), sz["text"][1]], dim=1)
        raw += c @ z
        signed += torch.sign(c) @ z
    raw /= n
    signed /= n
    assert float((raw - grad).norm() / grad.norm()) < 0.05
    assert float(F.cosine_similarity(signed, grad, dim=0)) > 0.99
    assert float(signed.norm()) == pytest.approx(np.sqrt(2 / np.pi), rel=0.05)
    # the probes never wrote to the parameters
    assert torch.equal(w, wr.detach()) and torch.equal(b, br.detach())


def test_zo_learner_gets_no_autograd_gradient_and_no_optimizer_state():
    learners, zo = make()
    data = pairs(16, 4, 1)
    step = StepInfo(1, "toy", ("text", "audio"), 3)
    zo.before_step(step, data)
    assert zo.frozen(step) == ("text",)
    # what the trainer does with a frozen learner (fit_step): out of autograd and of the optimizer
    learners["text"].requires_grad_(False)
    opt = build_optimizer(learners, ADAM, frozen=zo.frozen(step))
    w_text, b_text = learners["text"].weight, learners["text"].bias

    def closure():
        learners.zero_grad(set_to_none=True)
        out = learners.forward_pairs(data)
        losses = zo.losses(data, out)
        sum(losses.values()).backward()
        return losses, out

    _, out = zo.compute_gradients(closure)
    assert w_text.grad is None and b_text.grad is None
    # the FO gradient is autograd's gradient of L with the ZO learner held constant
    wa = learners["audio"].weight.detach().clone().requires_grad_(True)
    info_nce(learners["text"](data.xa).detach(), F.linear(data.xb, wa, learners["audio"].bias.detach())).backward()
    torch.testing.assert_close(learners["audio"].weight.grad, wa.grad)
    opt.step()
    zo.after_update(data, out)
    assert w_text not in opt.state and b_text not in opt.state and learners["audio"].weight in opt.state
    # through the trainer: the frozen learner gets its requires_grad back after the step
    learners2, zo2 = make()
    fit_step(learners2, zo2, step, data, harness=ADAM, epochs=1, batch_size=8)
    assert learners2["text"].weight.requires_grad and learners2["text"].bias.requires_grad


def test_conservative_update_never_raises_the_batch_loss():
    def run(conservative):
        learners, zo = make(d=6, lr_zo=0.05, weight_decay_zo=0.0, conservative=conservative)
        data = pairs(32, 6, 2)
        zo.before_step(StepInfo(1, "toy", ("text", "audio"), 11), data)
        deltas = []
        for i in range(20):
            rows = data.select(torch.arange(8 * (i % 4), 8 * (i % 4) + 8))
            with torch.no_grad():
                out = learners.forward_pairs(rows)
                before = float(info_nce(out.u, out.v))
                zo.after_update(rows, out)
                after = float(info_nce(learners["text"](rows.xa), out.v))
            deltas.append(after - before)
        return np.array(deltas), zo.report()

    deltas, report = run(True)
    assert (deltas <= 1e-6).all()
    assert (deltas < -1e-4).any() and 0 < report["zo/accept_rate"] <= 1
    aggressive, _ = run(False)
    assert (aggressive > 1e-4).any()     # the plain step does raise it sometimes: the rule matters


def test_side_rule_on_the_paper_protocol():
    protocol = load_protocol("paper11")
    got = [rule_side(s.modalities) for s in protocol.steps]
    assert got == ["text", "text", "depth", "text", "text", "text", "audio", "tactile", "text", "text", "thermal"]


def test_vision_tower_perturbation_and_step_are_scaled():
    moved = {}
    for side, pair in (("a", ("text", "video")), ("b", ("text", "video"))):
        learners, zo = make(side=side, conservative=False, weight_decay_zo=0.0, eps_vision=2.5e-4)
        data = pairs(8, 4, 3, pair=pair)
        zo.before_step(StepInfo(1, "toy", pair, 9), data)
        m = zo._zo[0]
        w0 = learners[m].weight.detach().clone()
        with torch.no_grad():
            zo.after_update(data, learners.forward_pairs(data))
        moved[m] = float((learners[m].weight.detach() - w0).norm())
    assert moved["video"] / moved["text"] == pytest.approx(0.25, rel=1e-4)


def test_same_seed_same_parameters_and_lr_zero_freezes_the_zo_side():
    def final(seed, **params):
        learners, zo = make(d=6, **params)
        data = pairs(40, 6, 4)
        fit_step(learners, zo, StepInfo(1, "toy", ("text", "audio"), seed), data, harness=ADAM, epochs=1,
                 batch_size=10)
        return learners, zo

    l1, z1 = final(7, lr_zo=1e-2)
    l2, _ = final(7, lr_zo=1e-2)
    l3, _ = final(8, lr_zo=1e-2)
    assert all(torch.equal(p, q) for p, q in zip(l1.parameters(), l2.parameters()))
    assert not torch.equal(l1["text"].weight, l3["text"].weight)
    assert z1.report()["zo/drift/text"] > 0
    frozen, zf = final(7, lr_zo=0.0)
    ref, _ = make(d=6)
    assert torch.equal(frozen["text"].weight, ref["text"].weight)
    assert not torch.equal(frozen["audio"].weight, ref["audio"].weight)
    assert zf.report()["zo/drift/text"] == 0.0


def test_dual_mode_moves_both_learners_without_gradients():
    learners, zo = make(d=6, mode="dual", lr_zo=1e-2)
    ref, _ = make(d=6)
    grads = []
    original = zo.after_update

    def spy(batch, out):
        grads.append([p.grad for m in ("text", "audio") for p in learners[m].parameters()])
        original(batch, out)

    zo.after_update = spy
    fit_step(learners, zo, StepInfo(1, "toy", ("text", "audio"), 1), pairs(40, 6, 5), harness=ADAM, epochs=1,
             batch_size=10)
    assert grads and all(g is None for row in grads for g in row)
    assert all(not torch.equal(learners[m].weight, ref[m].weight) for m in ("text", "audio"))


@pytest.mark.parametrize("silent, expected", [("text", "audio"), ("audio", "text")])
def test_auto_side_picks_the_lower_variance_learner(silent, expected):
    # A learner mapping everything to 0 makes every logit 0 whatever the *other* learner does: the
    # loss is flat in the other learner's parameters, so its estimates do not vary at all.
    learners, zo = make(d=6, side="auto")
    with torch.no_grad():
        learners[silent].weight.zero_()
        learners[silent].bias.zero_()
    zo.before_step(StepInfo(1, "toy", ("text", "audio"), 2), pairs(128, 6, 6))
    assert zo._zo == (expected,)
    report = zo.report()
    assert report[f"zo/auto_variance/{expected}"] < 1e-3 * report[f"zo/auto_variance/{silent}"]
