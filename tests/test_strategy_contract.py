"""The contract every registered strategy keeps (style.md §6.2), parametrised over the registry."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cmcl.data import runs as ckpt
from cmcl.train.config import Harness, TrainConfig
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import STRATEGIES, get_strategy, resolve_params
from cmcl.train.strategies.base import Objective
from cmcl.pipeline import train_one
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

from tests.helpers import random_pairs

NAMES = sorted(STRATEGIES)
HARNESS = Harness(lr=1e-2, weight_decay=1e-2, decay_bias=False, linear_decay=True, clip_norm=1.0)


def pairs(n, d, seed, pair):
    return random_pairs(n, d, seed, pair, coupling=0.3, labels=np.arange(n) % 4)


STEPS = [("toyA", ("text", "audio")), ("toyB", ("vision", "depth")), ("toyC", ("audio", "text"))]


def run_steps(name, learners, strategy, checks=None):
    for i, (ds, pair) in enumerate(STEPS, start=1):
        data = pairs(48, learners.dim, i, pair)
        data.step[:] = i
        fit_step(learners, strategy, StepInfo(i, ds, pair, 100 + i), data, harness=HARNESS, epochs=2, batch_size=16)
        if checks:
            checks(i, pair)


@pytest.mark.parametrize("name", NAMES)
def test_losses_are_finite_scalars_keyed_loss(name):
    learners = ModalityLearners(["text", "audio", "vision", "depth", "video"], 8)
    strategy = get_strategy(name)
    seen = []
    original = strategy.losses

    def checked(batch, out):
        losses = original(batch, out)
        assert losses and all(k.endswith("_loss") for k in losses), losses.keys()
        for v in losses.values():
            assert v.ndim == 0 and torch.isfinite(v)
        seen.append(len(losses))
        return losses

    strategy.losses = checked
    strategy.setup(learners, Objective())
    run_steps(name, learners, strategy)
    assert seen
    report = strategy.report()
    assert all(isinstance(v, float) and np.isfinite(v) for v in report.values())


@pytest.mark.parametrize("name", NAMES)
def test_learners_outside_the_pair_stay_bit_identical(name):
    learners = ModalityLearners(["text", "audio", "vision", "depth", "video"], 8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    video = [p.detach().clone() for p in learners["video"].parameters()]
    strategy = get_strategy(name)
    strategy.setup(learners, Objective())
    checked = []

    def check(i, pair):
        # video is in no step: no gradient ever, so AdamW's decay and moments never touch it
        assert all(p.grad is None for p in learners["video"].parameters())
        assert all(torch.equal(p, q) for p, q in zip(learners["video"].parameters(), video))
        checked.append(i)

    run_steps(name, learners, strategy, check)
    assert checked == [1, 2, 3]


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_a_safe_checkpoint(name):
    learners = ModalityLearners(["text", "audio", "vision", "depth", "video"], 8)
    strategy = get_strategy(name)
    strategy.setup(learners, Objective())
    run_steps(name, learners, strategy)
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = get_strategy(name)
    other.setup(learners, Objective())
    other.load_state_dict(state)
    assert _same(strategy.state_dict(), other.state_dict())


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def config(cache, protocol, name, seed=0):
    return TrainConfig(features=str(cache), backbone="synthetic", strategy=name,
                       params=resolve_params(name, {}, "synthetic"), label=name, seed=seed,
                       protocol=str(protocol), epochs=1)


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_cache, short_protocol, tmp_path, name):
    full = train_one(config(tiny_cache, short_protocol, name), tmp_path / "full", keep_states="all")
    part_root = tmp_path / "part"
    part = ckpt.run_dir(part_root, "synthetic", name, 0)
    shutil.copytree(full, part)
    # A kill during step 3: its folder never appeared, a temp folder was left behind, step 2's
    # strategy state is the last one kept.
    shutil.rmtree(ckpt.step_dir(part, 3))
    (part / "results.csv").unlink()
    (part / "step-03.tmp").mkdir()
    (ckpt.step_dir(part, 1) / "strategy.pt").unlink()
    train_one(config(tiny_cache, short_protocol, name), part_root, resume=True)
    wf = load_file(str(ckpt.step_dir(full, 3) / "learners.safetensors"))
    wp = load_file(str(ckpt.step_dir(part, 3) / "learners.safetensors"))
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    rf, rp = pd.read_csv(full / "results.csv"), pd.read_csv(part / "results.csv")
    np.testing.assert_array_equal(rf["value"].to_numpy(), rp["value"].to_numpy())
    assert not (part / "step-03.tmp").exists()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_numbers(name):
    def final(seed):
        torch.manual_seed(seed)
        learners = ModalityLearners(["text", "audio", "vision", "depth", "video"], 8)
        strategy = get_strategy(name)
        strategy.setup(learners, Objective())
        run_steps(name, learners, strategy)
        return torch.cat([p.detach().flatten() for p in learners.parameters()])

    assert torch.equal(final(0), final(0))
