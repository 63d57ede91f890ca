"""Trainer: hook order, parameter scope, checkpoints, resume and determinism."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.errors import RunError
from cmcl.train import checkpoint as ckpt
from cmcl.train.config import Harness, TrainConfig
from cmcl.train.learners import ModalityLearners
from cmcl.train.objective import info_nce
from cmcl.train.strategies import STRATEGIES, get_strategy, resolve_params
from cmcl.train.strategies.base import Objective, Strategy
from cmcl.train.trainer import fit_step, train_run
from cmcl.types import StepInfo


class Recorder(Strategy):
    """Records every hook call."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setup(self, learners, objective):
        super().setup(learners, objective)
        self.calls.append("setup")

    def before_step(self, step, data):
        self.calls.append("before_step")

    def training_set(self, step, data):
        self.calls.append("training_set")
        return data

    def losses(self, batch, out):
        self.calls.append("losses")
        return super().losses(batch, out)

    def compute_gradients(self, closure):
        self.calls.append("compute_gradients")
        result = closure()
        assert all(p.grad is not None for p in self.learners["text"].parameters())
        return result

    def before_update(self, batch, out):
        self.calls.append("before_update")
        self._w = self.learners["text"].weight.detach().clone()

    def after_update(self, batch, out):
        self.calls.append("after_update")
        assert not torch.equal(self._w, self.learners["text"].weight)  # the optimizer stepped in between

    def after_step(self, step, data):
        self.calls.append("after_step")


def toy_data(n=40, d=8, seed=0, pair=("text", "audio")):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    return PairedFeatures.from_arrays(x / np.linalg.norm(x, axis=1, keepdims=True),
                                      y / np.linalg.norm(y, axis=1, keepdims=True), pair, 1)


ADAM = Harness(lr=1e-2, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)


def test_hooks_fire_in_order_and_all_are_reachable():
    learners = ModalityLearners(["text", "audio"], 8)
    rec = Recorder()
    rec.setup(learners, Objective())
    fit_step(learners, rec, StepInfo(1, "toy", ("text", "audio"), 0), toy_data(), harness=ADAM, epochs=2,
             batch_size=16)
    per_batch = ["compute_gradients", "losses", "before_update", "after_update"]
    assert rec.calls == ["setup", "before_step", "training_set", *per_batch * 6, "after_step"]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_learners_outside_the_pair_stay_bit_identical(name):
    learners = ModalityLearners(["text", "audio", "video", "depth"], 8)
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(0.01 * torch.randn_like(p))
    frozen = {m: [p.detach().clone() for p in learners[m].parameters()] for m in ("video", "depth")}
    s = get_strategy(name)
    s.setup(learners, Objective())
    for i, pair in enumerate([("text", "audio"), ("audio", "text")], start=1):
        fit_step(learners, s, StepInfo(i, "toy", pair, i), toy_data(seed=i, pair=pair),
                 harness=Harness(1e-2, 0.1, True, True, 1.0), epochs=1, batch_size=16)
    for m, params in frozen.items():
        for p, q in zip(learners[m].parameters(), params):
            assert p.grad is None
            assert torch.equal(p, q)


def test_loss_matches_hand_computation_and_b_bias_gets_no_gradient():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    v = torch.tensor([[0.5, 0.5], [0.0, 1.0], [2.0, 0.0]])
    s = (u @ v.T).numpy()
    want = np.mean([-(s[i, i] - np.log(np.exp(s[i]).sum())) for i in range(3)])
    assert float(info_nce(u, v)) == pytest.approx(want, rel=1e-6)
    sym = 0.5 * (want + np.mean([-(s[i, i] - np.log(np.exp(s[:, i]).sum())) for i in range(3)]))
    assert float(info_nce(u, v, direction="symmetric")) == pytest.approx(sym, rel=1e-6)
    learners = ModalityLearners(["text", "audio"], 8)
    batch = toy_data()
    out = learners.forward_pairs(batch)
    info_nce(out.u, out.v).backward()
    assert torch.allclose(learners["audio"].bias.grad, torch.zeros(8), atol=1e-7)
    assert learners["text"].bias.grad.abs().sum() > 0


def test_identity_init_and_mixed_batches_use_each_rows_learners():
    learners = ModalityLearners(["text", "audio", "video"], 6)
    x = torch.randn(5, 6)
    assert torch.equal(learners("text", x), x)
    with torch.no_grad():
        for p in learners.parameters():
            p.copy_(torch.randn_like(p))
    a = toy_data(n=6, d=6, pair=("text", "audio"))
    b = toy_data(n=4, d=6, seed=3, pair=("video", "text"))
    mixed = PairedFeatures.concat([a, b])
    out = learners.forward_pairs(mixed)
    torch.testing.assert_close(out.u[:6], learners("text", a.xa))
    torch.testing.assert_close(out.u[6:], learners("video", b.xa))
    torch.testing.assert_close(out.v[6:], learners("text", b.xb))


def config(cache, protocol, strategy="dns", seed=0, **kw):
    return TrainConfig(features=str(cache), backbone="synthetic", strategy=strategy,
                       params=resolve_params(strategy, {}, "synthetic"), label=strategy, seed=seed,
                       protocol=str(protocol), epochs=2, **kw)


def final_state(run):
    from safetensors.torch import load_file

    last = ckpt.finished_steps(run)[-1]
    return load_file(str(ckpt.step_dir(run, last) / "learners.safetensors")), pd.read_csv(run / "results.csv")


def test_run_layout_and_same_seed_gives_identical_numbers(tiny_cache, short_protocol, tmp_path):
    a = train_run(config(tiny_cache, short_protocol), tmp_path / "a")
    b = train_run(config(tiny_cache, short_protocol), tmp_path / "b")
    assert ckpt.finished_steps(a) == [0, 1, 2, 3]
    for i in (1, 2, 3):
        assert (ckpt.step_dir(a, i) / "eval.csv").is_file() and (ckpt.step_dir(a, i) / "losses.csv").is_file()
    assert (ckpt.step_dir(a, 3) / "strategy.pt").is_file() and not (ckpt.step_dir(a, 2) / "strategy.pt").exists()
    header = json.loads((a / "config.json").read_text())
    assert header["config"]["params"]["lambda_min"] == 1e-3 and header["protocol"]["steps"][0] == "esc50:text-audio"
    metrics = json.loads((ckpt.step_dir(a, 2) / "metrics.json").read_text())
    assert metrics["report"]["dns/rank_in/text"] > 0
    wa, ra = final_state(a)
    wb, rb = final_state(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    np.testing.assert_array_equal(ra["value"].to_numpy(), rb["value"].to_numpy())
    c = train_run(config(tiny_cache, short_protocol, seed=1), tmp_path / "c")
    assert not torch.equal(final_state(c)[0]["layers.text.weight"], wa["layers.text.weight"])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_cache, short_protocol, tmp_path, name):
    full = train_run(config(tiny_cache, short_protocol, name), tmp_path / "full")
    part = train_run(config(tiny_cache, short_protocol, name), tmp_path / "part")
    # Simulate a kill during step 3: its folder never appeared, a temp folder was left behind.
    shutil.rmtree(ckpt.step_dir(part, 3))
    (part / "results.csv").unlink()
    (part / "step-03.tmp").mkdir()
    # ... and the state of step 2 is there because it was the last finished one at the time.
    torch.save(_state_after_step(tiny_cache, short_protocol, name, tmp_path), ckpt.step_dir(part, 2) / "strategy.pt")
    train_run(config(tiny_cache, short_protocol, name), tmp_path / "part", resume=True)
    wf, rf = final_state(full)
    wp, rp = final_state(part)
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    np.testing.assert_array_equal(rf["value"].to_numpy(), rp["value"].to_numpy())
    assert not (part / "step-03.tmp").exists()


def _state_after_step(cache, protocol, name, tmp_path):
    run = train_run(config(cache, protocol, name), tmp_path / "states", keep_states="all")
    return torch.load(ckpt.step_dir(run, 2) / "strategy.pt", weights_only=True)


def test_resume_with_a_different_config_is_refused(tiny_cache, short_protocol, tmp_path):
    run = train_run(config(tiny_cache, short_protocol, "vanilla"), tmp_path)
    with pytest.raises(RunError, match="already exists"):
        train_run(config(tiny_cache, short_protocol, "vanilla"), tmp_path)
    with pytest.raises(RunError, match="differs in epochs"):
        cfg = TrainConfig(**{**config(tiny_cache, short_protocol, "vanilla").to_dict(), "epochs": 3})
        train_run(cfg, tmp_path, resume=True)
    before = (run / "results.csv").read_bytes()
    train_run(config(tiny_cache, short_protocol, "vanilla"), tmp_path, resume=True)  # complete: nothing to do
    assert (run / "results.csv").read_bytes() == before
