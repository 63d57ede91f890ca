"""DNS: the defining property (old alignments kept), the fast projection, and the one-sided default."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.config import Harness
from cmcl.train.learners import FactoredTransform, ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.dns import DNS
from cmcl.train.strategies.projection import Projector, project_out, projector_from_covariance
from cmcl.train.trainer import fit_step, weight_inputs
from cmcl.types import StepInfo

D = 12


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def low_rank_pairs(seed, n=96, rank=4):
    """Pairs whose inputs live in rank-`rank` subspaces (so old steps leave room to learn)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, rank))
    xa = unit_rows(z @ rng.standard_normal((rank, D)))
    xb = unit_rows((z + 0.3 * rng.standard_normal((n, rank))) @ rng.standard_normal((rank, D)))
    return xa.astype(np.float32), xb.astype(np.float32)


def generic_pairs(seed, n=96):
    rng = np.random.default_rng(seed)
    xa = rng.standard_normal((n, D))
    xb = xa @ rng.standard_normal((D, D)) * 0.5 + rng.standard_normal((n, D))
    return unit_rows(xa).astype(np.float32), unit_rows(xb).astype(np.float32)


def alignment(learners, a, b, xa, xb):
    with torch.no_grad():
        return learners(a, torch.as_tensor(xa)) @ learners(b, torch.as_tensor(xb)).T


def run_two_steps(strategy_name, lr, params=None, step2_pair=("text", "audio")):
    """Step 1 on low-rank (text, audio) data; step 2 on generic data; returns the step-1 alignment change."""
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "video"], D)
    strategy = get_strategy(strategy_name, **(params or {}))
    strategy.setup(learners, Objective())
    sgd = Harness(lr=lr, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=None, optimizer="sgd")
    xa1, xb1 = low_rank_pairs(1)
    step1 = PairedFeatures.from_arrays(xa1, xb1, ("text", "audio"), 1)
    fit_step(learners, strategy, StepInfo(1, "A", ("text", "audio"), 11), step1, harness=Harness(
        lr=0.5, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=None, optimizer="sgd"),
        epochs=3, batch_size=32)
    before = alignment(learners, "text", "audio", xa1, xb1)
    xa2, xb2 = generic_pairs(2)
    step2 = PairedFeatures.from_arrays(xa2, xb2, step2_pair, 2)
    fit_step(learners, strategy, StepInfo(2, "B", step2_pair, 22), step2, harness=sgd, epochs=2, batch_size=32)
    after = alignment(learners, "text", "audio", xa1, xb1)
    return float(torch.linalg.norm(after - before)), learners


def test_one_sided_default_keeps_old_alignment_exactly_under_sgd():
    # lambda_left = 0 (authors' default): Q = I, the old inputs' outputs W x cannot move at all.
    change, _ = run_two_steps("dns", 0.5, {"lambda_min": 1e-9, "project_bias": True})
    vanilla, _ = run_two_steps("vanilla", 0.5)
    assert vanilla > 1e-2
    assert change < 1e-5 * vanilla * 100 and change < 1e-4


def test_dual_sided_change_is_second_order_while_vanilla_is_first_order():
    params = {"lambda_min": 1e-9, "lambda_left": 1e-9, "project_bias": True}
    dns_big, _ = run_two_steps("dns", 0.2, params)
    dns_small, _ = run_two_steps("dns", 0.1, params)
    van_big, _ = run_two_steps("vanilla", 0.2)
    van_small, _ = run_two_steps("vanilla", 0.1)
    assert van_big / van_small == pytest.approx(2.0, rel=0.15)   # O(eta)
    assert dns_big / dns_small == pytest.approx(4.0, rel=0.2)    # O(eta^2)
    assert dns_big < 0.05 * van_big


def test_dns_with_adamw_forgets_less_than_vanilla():
    def change(name, params=None):
        torch.manual_seed(0)
        learners = ModalityLearners(["text", "audio"], D)
        s = get_strategy(name, **(params or {}))
        s.setup(learners, Objective())
        adam = Harness(lr=1e-2, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=None)
        xa1, xb1 = low_rank_pairs(1)
        fit_step(learners, s, StepInfo(1, "A", ("text", "audio"), 1),
                 PairedFeatures.from_arrays(xa1, xb1, ("text", "audio"), 1), harness=adam, epochs=2, batch_size=32)
        before = alignment(learners, "text", "audio", xa1, xb1)
        xa2, xb2 = generic_pairs(2)
        fit_step(learners, s, StepInfo(2, "B", ("text", "audio"), 2),
                 PairedFeatures.from_arrays(xa2, xb2, ("text", "audio"), 2), harness=adam, epochs=2, batch_size=32)
        return float(torch.linalg.norm(alignment(learners, "text", "audio", xa1, xb1) - before))

    vanilla = change("vanilla")
    grad = change("dns", {"lambda_min": 1e-9})
    update = change("dns", {"lambda_min": 1e-9, "project": "update", "project_bias": True})
    assert grad < 0.7 * vanilla        # projecting the gradient leaks through Adam's rescaling (finding 3)
    assert update < 1e-4 * vanilla     # projecting the update does not


@pytest.mark.parametrize("rank_p, rank_q", [(3, 12), (9, 12), (3, 4), (0, 5), (12, 12), (8, 2)])
def test_fast_projection_equals_dense(rank_p, rank_q):
    g = torch.Generator().manual_seed(rank_p * 31 + rank_q)
    d, b = 12, 5
    x = torch.randn(b, d, generator=g)
    delta = torch.randn(b, d, generator=g)
    scale = 0.37
    grad = scale * delta.T @ x
    up = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    uq = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    right = Projector.from_basis(up[:, :rank_p])
    left = Projector.from_basis(uq[:, :rank_q])
    dense = left.dense() @ grad @ right.dense()
    want = uq[:, :rank_q] @ uq[:, :rank_q].T @ grad @ up[:, :rank_p] @ up[:, :rank_p].T
    torch.testing.assert_close(dense, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(project_out(grad, left, right), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(project_out(grad, left, right, x=x, delta=delta, scale=scale), want,
                               atol=1e-5, rtol=1e-5)


def test_rank_b_route_uses_the_trainers_clip_factor():
    """At large d and small B, DNS projects via (Qδᵀ)(XP), scaled by the factor the trainer clipped by."""
    d, b = 256, 8
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio"], d)
    dns = get_strategy("dns", lambda_min=1e-6, lambda_left=1e-6)
    dns.setup(learners, Objective())
    old = PairedFeatures.from_arrays(unit_rows(np.random.default_rng(0).standard_normal((200, d))).astype(np.float32),
                                     unit_rows(np.random.default_rng(1).standard_normal((200, d))).astype(np.float32),
                                     ("text", "audio"), 1)
    # low-rank history so projectors are proper subspaces (rank 40 of 256)
    old.xa = old.xa @ torch.linalg.qr(torch.randn(d, 40))[0] @ torch.randn(40, d)
    old.xb = old.xb @ torch.linalg.qr(torch.randn(d, 40))[0] @ torch.randn(40, d)
    info = StepInfo(1, "A", ("text", "audio"), 0)
    dns.after_step(info, old)
    dns.before_step(StepInfo(2, "B", ("text", "audio"), 0), old)
    batch = old.select(torch.arange(b))
    out = learners.forward_pairs(batch)
    out.u.retain_grad()  # what the trainer does for output_grads: the rank-B route reads dL/du
    out.v.retain_grad()
    loss = dns.losses(batch, out)["contrastive_loss"]
    loss.backward()
    w = learners["text"].weight
    w.grad.mul_(0.25)  # what clipping would do; the trainer reports it on the output
    out.grad_scale = 0.25
    raw = w.grad.clone()
    left, right = dns._proj["text"]
    want = raw - left.dense() @ raw @ right.dense()
    dns.before_update(batch, out)
    torch.testing.assert_close(w.grad, want, atol=1e-6, rtol=1e-4)


def test_left_threshold_zero_is_exactly_one_sided():
    torch.manual_seed(1)
    learners = ModalityLearners(["text", "audio"], D)
    dns = get_strategy("dns", lambda_min=0.02)
    dns.setup(learners, Objective())
    xa, xb = low_rank_pairs(3)
    data = PairedFeatures.from_arrays(xa, xb, ("text", "audio"), 1)
    dns.after_step(StepInfo(1, "A", ("text", "audio"), 0), data)
    step = StepInfo(2, "A", ("text", "audio"), 0)
    dns.before_step(step, data)
    learners.grad_inputs.update(dns.weight_grad_inputs(step))  # as the trainer installs them
    left, right = dns._proj["text"]
    assert left.is_identity and 0 < right.rank < D
    batch = data.select(torch.arange(16))
    out = learners.forward_pairs(batch)
    out.u.retain_grad()
    out.v.retain_grad()
    dns.losses(batch, out)["contrastive_loss"].backward()
    g = learners["text"].weight.grad.clone()
    cov = dns.cov_in["text"]
    evals, evecs = torch.linalg.eigh(cov)
    u = evecs[:, evals > 0.02].float()
    dns.before_update(batch, out)
    torch.testing.assert_close(learners["text"].weight.grad, g - g @ u @ u.T, atol=1e-7, rtol=1e-6)


def test_projector_thresholds():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 10)) * np.array([3, 2, 1, 0.5, 0.1, 0.01, 0, 0, 0, 0])
    cov = torch.as_tensor(x.T @ x / 500)
    assert projector_from_covariance(cov, threshold=0.0).is_identity
    assert projector_from_covariance(cov, threshold=0.2).rank == 4
    full = projector_from_covariance(cov, energy=1.0)
    assert full.rank >= 6
    assert projector_from_covariance(cov, energy=0.6).rank == 1
    assert projector_from_covariance(torch.zeros(10, 10, dtype=torch.float64), threshold=0.1).is_zero


def _three_step_covariances(count):
    """Steps 1 (text, audio) n=50, 2 (text, video) n=30, 3 (audio, depth) n=20: depth first appears at
    step 3. The audio learner is 2·I when step 3 ends, so depth's partner outputs are 2·y."""
    learners = ModalityLearners(["text", "audio", "video", "depth"], D)
    dns = get_strategy("dns", count=count, lambda_left=1e-6)  # dual-sided: output covariances are kept
    dns.setup(learners, Objective())
    x1, y1 = low_rank_pairs(1, n=50)
    x2, v2 = low_rank_pairs(2, n=30)
    y3, d3 = low_rank_pairs(3, n=20)
    dns.after_step(StepInfo(1, "A", ("text", "audio"), 0), PairedFeatures.from_arrays(x1, y1, ("text", "audio"), 1))
    dns.after_step(StepInfo(2, "B", ("text", "video"), 0), PairedFeatures.from_arrays(x2, v2, ("text", "video"), 2))
    with torch.no_grad():
        learners["audio"].weight.mul_(2.0)
    dns.after_step(StepInfo(3, "C", ("audio", "depth"), 0), PairedFeatures.from_arrays(y3, d3, ("audio", "depth"), 3))
    g = {k: v.astype(np.float64).T @ v.astype(np.float64)
         for k, v in {"x1": x1, "y1": y1, "x2": x2, "v2": v2, "y3": y3, "d3": d3}.items()}
    return dns, g


def test_shared_count_is_algorithm_1_over_all_steps():
    """The default: n̄_t = 50, 80, 100 for every modality (Algorithm 1 line 16, the authors' code)."""
    dns, g = _three_step_covariances("shared")
    expected_in = {
        "text": (g["x1"] / 50) * (50 / 80) + g["x2"] / 80,      # steps 1 and 2
        "audio": (g["y1"] / 50) * (80 / 100) + g["y3"] / 100,   # steps 1 and 3: step 1 down-weighted
        "video": g["v2"] / 80,                                  # enters at n̄_2 = 80, not 30
        "depth": g["d3"] / 100,                                 # enters at n̄_3 = 100, not 20
    }
    expected_out = {
        "text": (g["y1"] / 50) * (50 / 80) + g["v2"] / 80,
        "audio": (g["x1"] / 50) * (80 / 100) + g["d3"] / 100,
        "video": g["x2"] / 80,
        "depth": 4.0 * g["y3"] / 100,                           # partner outputs 2·y under the 2·I learner
    }
    for m in expected_in:
        np.testing.assert_allclose(dns.cov_in[m].numpy(), expected_in[m], atol=1e-6, err_msg=m)
        np.testing.assert_allclose(dns.cov_out[m].numpy(), expected_out[m], atol=1e-6, err_msg=m)
    assert dns.n_bar == 100
    # the late modality's energy is diluted by n_t / n̄_t = 0.2 compared with its own running mean
    assert float(torch.trace(dns.cov_in["depth"])) == pytest.approx(0.2 * float(np.trace(g["d3"]) / 20), rel=1e-6)


def test_modality_count_is_a_running_mean_per_modality():
    """The option ``count=modality`` (cmcl's variant): every covariance is the plain mean of its own rows."""
    dns, g = _three_step_covariances("modality")
    expected_in = {"text": (g["x1"] + g["x2"]) / 80, "audio": (g["y1"] + g["y3"]) / 70,
                   "video": g["v2"] / 30, "depth": g["d3"] / 20}
    expected_out = {"text": (g["y1"] + g["v2"]) / 80, "audio": (g["x1"] + g["d3"]) / 70,
                    "video": g["x2"] / 30, "depth": 4.0 * g["y3"] / 20}
    for m in expected_in:
        np.testing.assert_allclose(dns.cov_in[m].numpy(), expected_in[m], atol=1e-6, err_msg=m)
        np.testing.assert_allclose(dns.cov_out[m].numpy(), expected_out[m], atol=1e-6, err_msg=m)
    assert dns.n_in == {"text": 80, "audio": 70, "video": 30, "depth": 20}


def test_shared_count_survives_a_checkpoint_and_rejects_unknown_rules():
    dns, _ = _three_step_covariances("shared")
    state = dns.state_dict()
    again = get_strategy("dns")
    again.setup(ModalityLearners(["text", "audio", "video", "depth"], D), Objective())
    again.load_state_dict(state)
    assert again.n_bar == 100
    old = {k: v for k, v in state.items() if k != "n_bar"}
    with pytest.raises(ValueError, match="count=modality"):
        again.load_state_dict(old)
    with pytest.raises(Exception, match="count"):
        get_strategy("dns", count="per_step")


@pytest.mark.parametrize("project_bias", [False, True])
def test_fused_projection_gives_the_same_update_as_the_hook(project_bias, monkeypatch):
    """Projecting inside back-propagation (no clipping, Q = I) equals G − G P applied in before_update,
    whether the step's rows are projected once (the default) or every batch projects its own."""
    import cmcl.train.trainer as trainer

    finals, calls = {}, {}
    for route in ("per step", "per batch", "hook"):
        monkeypatch.setattr(trainer, "WEIGHT_INPUTS_BYTES", 0 if route == "per batch" else 2 << 30)
        torch.manual_seed(0)
        learners = ModalityLearners(["text", "audio"], D)
        dns = get_strategy("dns", lambda_min=0.02, project_bias=project_bias, fused=route != "hook")
        dns.setup(learners, Objective())
        calls[route] = 0

        def counting(step, hook=dns.weight_grad_inputs, route=route):  # counts the transforms of rows
            def count(f):
                if isinstance(f, FactoredTransform):   # per step its rows are prepared, per batch both parts
                    return FactoredTransform(count(f.prepare), f.finish)

                def g(x):
                    calls[route] += 1
                    return f(x)
                return g
            return {m: count(f) for m, f in hook(step).items()}
        dns.weight_grad_inputs = counting
        # SGD: Adam would amplify the rounding noise of the b-side bias gradient (analytically 0)
        sgd = Harness(lr=0.5, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None, optimizer="sgd")
        for i, seed in enumerate((1, 2, 3), start=1):
            xa, xb = low_rank_pairs(seed) if i == 1 else generic_pairs(seed)
            fit_step(learners, dns, StepInfo(i, "A", ("text", "audio"), i),
                     PairedFeatures.from_arrays(xa, xb, ("text", "audio"), i), harness=sgd, epochs=2, batch_size=32)
            assert dns.report()["dns/fused"] == (2.0 if route != "hook" and i > 1 else 0.0)
        assert not learners.grad_inputs  # cleared after each step
        finals[route] = torch.cat([p.detach().flatten() for p in learners.parameters()])
    # steps 2 and 3 project both learners: per step, a width probe and all 96 rows at once;
    # per batch, the probe and then each of 2 epochs x 3 batches
    assert calls == {"per step": 2 * 2 * 2, "per batch": 2 * 2 * (1 + 2 * 3), "hook": 0}
    torch.testing.assert_close(finals["per step"], finals["hook"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(finals["per batch"], finals["hook"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("clip, project, retained", [(None, "gradient", [False, False]),
                                                     (1.0, "gradient", [False, True]),
                                                     (None, "update", [False, False])])
def test_output_gradients_are_retained_only_for_the_hook_route(clip, project, retained):
    """Step 1 protects nothing; at step 2 only the hook route (clipping) reads dL/du and dL/dv."""
    learners = ModalityLearners(["text", "audio"], D)
    dns = get_strategy("dns", lambda_min=0.02, project=project)
    dns.setup(learners, Objective())
    seen, hook = [], dns.before_update
    dns.before_update = lambda batch, out: seen.append(out.u.retains_grad) or hook(batch, out)
    harness = Harness(lr=1e-2, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=clip)
    for i in (1, 2):
        xa, xb = low_rank_pairs(i)
        fit_step(learners, dns, StepInfo(i, "A", ("text", "audio"), i),
                 PairedFeatures.from_arrays(xa, xb, ("text", "audio"), i), harness=harness, epochs=1, batch_size=48)
        assert set(seen) == {retained[i - 1]} and dns.output_grads == retained[i - 1]
        seen.clear()


def test_weight_inputs_are_the_transform_of_every_row_or_nothing():
    data = PairedFeatures.from_arrays(*generic_pairs(4, n=20000), ("text", "audio"), 1)
    u = torch.linalg.qr(torch.randn(D, 3, generator=torch.Generator().manual_seed(0)))[0]
    f = lambda x: x - (x @ u) @ u.T  # noqa: E731
    pre = weight_inputs(data, {"audio": f})
    assert set(pre) == {"b"}  # side b holds audio; text has no transform
    torch.testing.assert_close(pre["b"].rows, f(data.xb))
    rows = torch.tensor([5, 19999, 0, 8192])
    torch.testing.assert_close(pre["b"].batch(data.select(rows).xb, rows), f(data.select(rows).xb))
    assert weight_inputs(data, {"audio": f}, max_bytes=20000 * D * 4 - 1) == {}


def test_a_factored_transform_keeps_its_prepared_part_per_step_and_finishes_each_batch():
    """DNS's x (I − P) is kept as x U (k numbers per row): the batches' weight-gradient inputs are
    the projection of their rows, and the step holds N × k numbers, not N × d."""
    data = PairedFeatures.from_arrays(*generic_pairs(4, n=20000), ("text", "audio"), 1)
    right = Projector.from_basis(torch.linalg.qr(torch.randn(D, 3, generator=torch.Generator().manual_seed(0)))[0])
    dns = get_strategy("dns", lambda_min=0.02)
    f = dns._projected_inputs(right)
    assert isinstance(f, FactoredTransform)
    pre = weight_inputs(data, {"text": f, "audio": f})
    assert {s: tuple(p.rows.shape) for s, p in pre.items()} == {"a": (20000, 3), "b": (20000, 3)}
    assert weight_inputs(data, {"audio": f}, max_bytes=20000 * 3 * 4 - 1) == {}   # sized by x U
    rows = torch.tensor([5, 19999, 0, 8192])
    batch = data.select(rows)
    for side, x in (("a", batch.xa), ("b", batch.xb)):
        got = pre[side].batch(x, rows)
        assert torch.equal(got, f(x))       # the same products, on the batch's rows
        torch.testing.assert_close(got, right.right_complement(x))
        torch.testing.assert_close(got @ right.basis, torch.zeros(4, 3), atol=1e-5, rtol=0)   # in P's null space
    # with project_bias the rows are [x, 1], d + 1 wide
    g = get_strategy("dns", lambda_min=0.02, project_bias=True)._projected_inputs(
        Projector.from_basis(torch.linalg.qr(torch.randn(D + 1, 3, generator=torch.Generator().manual_seed(1)))[0]))
    assert tuple(weight_inputs(data, {"audio": g})["b"].batch(batch.xb, rows).shape) == (4, D + 1)
    mixed = PairedFeatures.concat([data.select(slice(0, 4)),
                                   PairedFeatures.from_arrays(*generic_pairs(5, n=4), ("video", "audio"), 2)])
    assert weight_inputs(mixed, {"audio": f}) == {}


def test_precomputed_weight_inputs_need_a_side_of_one_modality():
    learners = ModalityLearners(["text", "audio", "video"], D)
    learners.grad_inputs["text"] = lambda x: x
    mixed = PairedFeatures.concat([PairedFeatures.from_arrays(*generic_pairs(1, n=4), ("text", "audio"), 1),
                                   PairedFeatures.from_arrays(*generic_pairs(2, n=4), ("video", "audio"), 2)])
    with pytest.raises(ValueError, match="one modality"):
        learners.forward_pairs(mixed, weight_inputs={"a": mixed.xa})


def test_fused_projection_is_not_used_when_the_trainer_clips():
    learners = ModalityLearners(["text", "audio"], D)
    dns = get_strategy("dns", lambda_min=0.02)
    dns.setup(learners, Objective())
    clip = Harness(lr=1e-2, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=1.0)
    for i in (1, 2):
        xa, xb = low_rank_pairs(i)
        fit_step(learners, dns, StepInfo(i, "A", ("text", "audio"), i),
                 PairedFeatures.from_arrays(xa, xb, ("text", "audio"), i), harness=clip, epochs=1, batch_size=32)
        assert dns.report()["dns/fused"] == 0.0


def test_one_sided_default_keeps_no_output_covariance_and_reuses_a_datasets_gram(monkeypatch):
    """With Q = I (the default) the output covariances are never read, so none is computed; a later
    step handing over the very same input tensor (as the loader does within a dataset) reuses its
    Gram matrix, any other tensor does not, and the cache keeps no input alive."""
    learners = ModalityLearners(["text", "audio", "video"], D)
    dns = get_strategy("dns")
    dns.setup(learners, Objective())
    calls = []
    gram = DNS._gram
    monkeypatch.setattr(DNS, "_gram", staticmethod(lambda x: calls.append(len(x)) or gram(x)))
    x, y = low_rank_pairs(1, n=50)
    _, v = low_rank_pairs(2, n=50)
    tx, ty, tv = (torch.from_numpy(a) for a in (x, y, v))
    steps = [StepInfo(1, "A", ("text", "audio"), 0), StepInfo(2, "A", ("text", "video"), 0)]
    data = [PairedFeatures.from_arrays(tx, ty, ("text", "audio"), 1),
            PairedFeatures.from_arrays(tx, tv, ("text", "video"), 2)]
    for step, d in zip(steps, data):
        dns.before_step(step, d)
        dns.after_step(step, d)
    assert dns.cov_out == {} and len(calls) == 3          # text's Gram computed once for two steps
    g = {k: a.astype(np.float64).T @ a.astype(np.float64) for k, a in {"x": x, "y": y, "v": v}.items()}
    np.testing.assert_allclose(dns.cov_in["text"].numpy(), (g["x"] / 50) * (50 / 100) + g["x"] / 100, atol=1e-6)
    dns.before_step(StepInfo(3, "A", ("text", "audio"), 0), data[0])
    assert dns.report()["dns/rank_out/text"] == D          # Q = I for a trained modality
    other = PairedFeatures.from_arrays(torch.from_numpy(x.copy()), ty, ("text", "audio"), 3)  # same values
    dns.after_step(StepInfo(3, "A", ("text", "audio"), 0), other)
    assert len(calls) == 4                                 # text again; audio's tensor is step 1's
    last = PairedFeatures.from_arrays(x, y, ("text", "audio"), 4)
    dns.after_step(StepInfo(4, "A", ("text", "audio"), 0), last)
    assert len(calls) == 6                                 # the same memory in new tensors is not recognised
    # The cache holds its inputs weakly: once the steps' data are gone, nothing keeps them alive.
    alive = weakref.ref(tx), weakref.ref(ty), weakref.ref(other.xa)
    del tx, ty, tv, data, d, other
    gc.collect()
    assert [r() for r in alive] == [None, None, None]
    dns.before_step(StepInfo(5, "B", ("text", "audio"), 0), last)
    assert set(dns._grams) == {"text", "audio"}            # only step 4's inputs are still alive
    assert dns._grams["text"][0]() is last.xa and dns._grams["audio"][0]() is last.xb


@pytest.mark.parametrize("rows, dim", [(20_000, 1025), (300, 7), (5, 3)])
def test_the_gram_matrix_is_the_float64_product_and_exactly_symmetric(monkeypatch, rows, dim):
    """The Gram matrix is summed over row blocks (made small here, so that several are summed) from
    the upper blocks of a column partition; it must equal XᵀX, ragged blocks and columns included."""
    import cmcl.train.strategies.dns as dns_module
    monkeypatch.setattr(dns_module, "_BLOCK", 4096)
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows))
    got = DNS._gram(x)
    want = x.double().T @ x.double()
    assert got.dtype == torch.float64 and torch.equal(got, got.T)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3 * rows ** 0.5)
