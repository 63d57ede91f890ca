"""The paper's figures and Table 3: what the runs record for them, and what `cmcl evaluate --figures` writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners, PairOutput
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step, higher_order_term
from cmcl.types import StepInfo
from tests.helpers import perturbed_learners, random_pairs

PAIR = ("text", "audio")


def _inputs(seed: int):
    batch = random_pairs(32, 16, seed=seed, pair=PAIR)
    return batch.xa.double(), batch.xb.double()


def _forward(learners: ModalityLearners, xa, xb) -> PairOutput:
    return PairOutput(learners[PAIR[0]](xa), learners[PAIR[1]](xb))


def _params(learners: ModalityLearners) -> list[torch.Tensor]:
    return [p for m in PAIR for p in learners[m].parameters()]


@pytest.mark.parametrize("rule", ["sgd", "sign"])
def test_higher_order_term_equals_the_parameter_space_remainder(rule):
    """<dL/du, u' - u> + <dL/dv, v' - v> is <grad_theta L, theta' - theta> for affine learners, whatever the update."""
    xa, xb = _inputs(1)
    objective, lr = Objective(), 0.05
    learners = perturbed_learners(list(PAIR), 16, 0.1, torch.float64)
    params = _params(learners)
    with torch.no_grad():
        old = _forward(learners, xa, xb)
    out = _forward(learners, xa, xb)
    before = objective(out.u, out.v)
    grads = torch.autograd.grad(before, params)
    snapshot = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * (g if rule == "sgd" else g.sign()))
        new = _forward(learners, xa, xb)
        after = objective(new.u, new.v)
        first = sum((g * (p - o)).sum() for g, p, o in zip(grads, params, snapshot))
    want = float((after - before.detach() - first) / lr)
    got = float(higher_order_term(objective, old, new, lr))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert abs(got) > 1e-6  # a real second-order remainder, not zero by construction


def test_higher_order_term_vanishes_with_the_step_size():
    """o(η)/η -> 0 as η -> 0 (it is O(η) for a smooth loss): ten times smaller steps, ~ten times smaller."""
    xa, xb = _inputs(2)
    objective = Objective()
    values = []
    for lr in (1e-2, 1e-3):
        learners = perturbed_learners(list(PAIR), 16, 0.1, torch.float64)
        params = _params(learners)
        with torch.no_grad():
            old = _forward(learners, xa, xb)
        out = _forward(learners, xa, xb)
        grads = torch.autograd.grad(objective(out.u, out.v), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
            new = _forward(learners, xa, xb)
        values.append(float(higher_order_term(objective, old, new, lr)))
    assert values[1] / values[0] == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("strategy", ["vanilla", "dns"])
def test_recording_does_not_change_the_numbers(strategy):
    data = random_pairs(96, 16, seed=3, pair=PAIR)
    big = random_pairs(80, 16, seed=4, pair=PAIR)  # 10 updates of 8: recorded at updates 0 and 8
    h = Harness(1e-2, 1e-3, True, False, None)
    results = []
    for objective in (None, Objective()):
        torch.manual_seed(0)
        learners = ModalityLearners(list(PAIR), 16)
        strat = get_strategy(strategy, backbone=None)
        strat.setup(learners, Objective())
        res = [fit_step(learners, strat, StepInfo(i, "x", PAIR, 7 + i), data, harness=h, epochs=2, batch_size=32,
                        objective=objective) for i in (1, 2)]
        res.append(fit_step(learners, strat, StepInfo(3, "x", PAIR, 10), big, harness=h, epochs=1, batch_size=8,
                            objective=objective))
        results.append((learners.state_dict(), res))
    (a, ra), (b, rb) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "o_eta_over_eta" not in ra[1].losses and "o_eta_over_eta" in rb[1].losses
    recorded = rb[1].losses["o_eta_over_eta"].to_numpy()
    assert len(recorded) == 6 and np.isfinite(recorded[0]) and np.isnan(recorded[1:]).all()  # every 8th update
    pd.testing.assert_frame_equal(ra[1].losses, rb[1].losses.drop(columns="o_eta_over_eta"))
    third = rb[2].losses["o_eta_over_eta"]
    assert list(np.flatnonzero(np.isfinite(third.to_numpy()))) == [0, 8]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_evaluate_figures_writes_each_figure_with_its_data(tiny_cache, short_protocol, tmp_path):
    runs = tmp_path / "runs"
    r = invoke("train", "--features", tiny_cache, "--backbone", "synthetic", "--protocol", short_protocol, "--runs",
               runs, "--epochs", "1", "--device", "cpu", "--strategy", "vanilla", "--strategy", "dns",
               "--seeds", "0,1", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", "--runs", runs, "--report", tmp_path / "t2.csv", "--figures", "-q")
    assert r.exit_code == 0, r.output
    assert "Table 3" in r.output and "cpu" in r.output
    out = tmp_path / "t2_figures"
    for name in ("synthetic_vanilla", "synthetic_dns"):
        for fig in ("fig3a", "fig3b"):
            assert (out / f"{name}_{fig}.png").stat().st_size > 10_000
    from cmcl.data.runs import read_eval

    # Fig. 3a: deviations are A[N; i] - A[i; i] from the stored alignment scores, mean over seeds
    a = pd.read_csv(out / "synthetic_dns_fig3a.csv")
    aligns = [read_eval(runs / "synthetic" / "dns" / f"seed-{s}").query("metric == 'align'") for s in (0, 1)]
    for i in (1, 2):
        per_seed = [float(g.query(f"trained_through == 3 and eval_step == {i}")["value"].iloc[0])
                    - float(g.query(f"trained_through == {i} and eval_step == {i}")["value"].iloc[0])
                    for g in aligns]
        assert a.loc[a["step"] == i, "deviation_mean"].iloc[0] == pytest.approx(np.mean(per_seed), rel=1e-4, abs=1e-9)
    assert a.loc[a["step"] == 3, "deviation_mean"].iloc[0] == 0.0   # the last step against itself
    # o(η)/η: the mean over seeds of each step's recorded mean
    metrics = [json.loads((runs / "synthetic" / "dns" / f"seed-{s}" / "step-02" / "metrics.json").read_text())
               for s in (0, 1)]
    assert a.loc[a["step"] == 2, "o_eta_over_eta_mean"].iloc[0] == pytest.approx(
        np.mean([m["o_eta_over_eta"] for m in metrics]), rel=1e-5)

    # Fig. 3b: one point per update over the whole protocol, the seeds' mean loss
    b = pd.read_csv(out / "synthetic_vanilla_fig3b.csv")
    losses = [pd.concat([pd.read_csv(runs / "synthetic" / "vanilla" / f"seed-{s}" / f"step-{i:02d}" / "losses.csv")
                         for i in (1, 2, 3)], ignore_index=True) for s in (0, 1)]
    assert len(b) == len(losses[0]) and list(b["step"].unique()) == [1, 2, 3]
    assert b["loss_mean"].to_numpy() == pytest.approx(
        (losses[0]["contrastive_loss"] + losses[1]["contrastive_loss"]).to_numpy() / 2, rel=1e-5)

    # Table 3: mean of the recorded seconds per step, the device recorded
    t3 = pd.read_csv(out / "table3.csv")
    row = t3[t3["strategy"] == "dns"].iloc[0]
    secs = [json.loads((runs / "synthetic" / "dns" / f"seed-{s}" / f"step-{i:02d}" / "metrics.json").read_text())
            for s in (0, 1) for i in (1, 2, 3)]
    assert row["seconds_per_step_mean"] == pytest.approx(np.mean([m["train_seconds"] for m in secs]), rel=1e-3, abs=1e-4)
    assert row["device"] == "cpu" and row["steps"] == 6 and row["threads"] >= 1
    assert 0 < row["strategy_seconds_mean"] < row["seconds_per_step_mean"]

    # the comparison plot's data is Table 2
    comp = pd.read_csv(out / "comparison.csv")
    assert set(comp["strategy"]) == {"vanilla", "dns"} and (out / "comparison.png").stat().st_size > 10_000


def test_figures_of_runs_that_did_not_record_say_so(tiny_cache, short_protocol, tmp_path):
    """Runs from before this recording (no align rows, no o(η)/η): the figures are written and say so."""
    runs = tmp_path / "runs"
    r = invoke("train", "--features", tiny_cache, "--backbone", "synthetic", "--protocol", short_protocol, "--runs",
               runs, "--epochs", "1", "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    run = runs / "synthetic" / "dns" / "seed-0"
    for step in sorted(run.glob("step-*")):
        ev = pd.read_csv(step / "eval.csv")
        ev[ev["metric"] != "align"].to_csv(step / "eval.csv", index=False)
        if (step / "metrics.json").is_file():
            m = json.loads((step / "metrics.json").read_text())
            m.pop("o_eta_over_eta")
            (step / "metrics.json").write_text(json.dumps(m))
    r = invoke("evaluate", "--runs", runs, "--report", tmp_path / "t2.csv", "--figures", "-q")
    assert r.exit_code == 0, r.output
    a = pd.read_csv(tmp_path / "t2_figures" / "synthetic_dns_fig3a.csv")
    assert a["deviation_mean"].isna().all() and a["o_eta_over_eta_mean"].isna().all()
    assert (tmp_path / "t2_figures" / "synthetic_dns_fig3a.png").is_file()
