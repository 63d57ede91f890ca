"""A run that grows: ``--resume`` with a protocol that extends the run's one trains only the new steps."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cmcl.cli import cli
from cmcl.data import runs as run_files
from cmcl.errors import RunError
from cmcl.evaluate.report import result_matrix, summarize_run
from cmcl.pipeline import rescore_run, train_one
from cmcl.evaluate.evaluator import EvalSettings
from cmcl.train.config import TrainConfig
from cmcl.train.strategies import STRATEGIES, resolve_params

from conftest import SHORT_PROTOCOL

NAMES = sorted(STRATEGIES)
# The short protocol's first two steps (text-audio on esc50, clotho); the full one appends
# vggsound_s audio-video, a step with a modality (video) the first run never had.
P1 = SHORT_PROTOCOL[:SHORT_PROTOCOL.index("[[step]]\ndataset = \"vggsound_s\"")]


@pytest.fixture()
def protocols(tmp_path):
    p1, p2 = tmp_path / "p1.toml", tmp_path / "p2.toml"
    p1.write_text(P1)
    p2.write_text(SHORT_PROTOCOL)
    return p1, p2


def config(cache, protocol, name, seed=0):
    return TrainConfig(features=str(cache), backbone="synthetic", strategy=name,
                       params=resolve_params(name, {}, "synthetic"), label=name, seed=seed,
                       protocol=str(protocol), epochs=1)


@pytest.mark.parametrize("name", NAMES)
def test_p1_then_p2_by_resume_equals_p2_from_scratch(tiny_cache, protocols, tmp_path, name):
    p1, p2 = protocols
    scratch = train_one(config(tiny_cache, p2, name), tmp_path / "scratch")
    grown = train_one(config(tiny_cache, p1, name), tmp_path / "grown")
    assert run_files.finished_steps(grown) == [0, 1, 2]
    step2 = (run_files.step_dir(grown, 2) / "eval.csv").read_bytes()
    train_one(config(tiny_cache, p2, name), tmp_path / "grown", resume=True)
    assert run_files.finished_steps(grown) == [0, 1, 2, 3]
    assert (run_files.step_dir(grown, 2) / "eval.csv").read_bytes() == step2  # earlier rows are not recomputed
    for i in (1, 2, 3):
        ws = load_file(str(run_files.step_dir(scratch, i) / "learners.safetensors"))
        wg = load_file(str(run_files.step_dir(grown, i) / "learners.safetensors"))
        assert set(wg) <= set(ws) and (set(wg) == set(ws)) == (i == 3)
        assert all(torch.equal(ws[k], wg[k]) for k in wg), f"step {i}"
    rs, rg = pd.read_csv(scratch / "results.csv"), pd.read_csv(grown / "results.csv")
    keys = ["trained_through", "eval_step", "direction", "metric"]
    both = rs.merge(rg, on=keys, suffixes=("_s", "_g"))
    assert len(both) == len(rg) and len(rg) < len(rs)  # old rows x new column: never computed
    np.testing.assert_array_equal(both["value_s"].to_numpy(), both["value_g"].to_numpy())
    assert json.loads((grown / "summary.json").read_text()) == json.loads((scratch / "summary.json").read_text())
    header = json.loads((grown / "config.json").read_text())
    assert header["config"]["protocol"] == str(p2) and len(header["protocol"]["steps"]) == 3
    assert header["history"][0]["finished_steps"] == 2 and len(header["history"][0]["protocol"]["steps"]) == 2


def test_result_matrix_of_a_grown_run_and_its_summary(tiny_cache, protocols, tmp_path):
    p1, p2 = protocols
    grown = train_one(config(tiny_cache, p1, "vanilla"), tmp_path)
    train_one(config(tiny_cache, p2, "vanilla"), tmp_path, resume=True)
    R = result_matrix(run_files.read_eval(grown), "R@10", 3)
    # rows 0..2 were scored under P1: their step-3 cell is NaN; everything BWT reads is there
    assert np.isnan(R[:3, 2]).all() and not np.isnan(R[3]).any()
    assert not np.isnan(np.tril(R[1:], 0)[np.tril_indices(3)]).any()
    s = summarize_run(run_files.read_eval(grown), 3)
    expected_bwt = np.mean([R[3, j] - R[j + 1, j] for j in range(2)])
    assert s["BWT_R10"] == pytest.approx(expected_bwt) and np.isfinite(s["BWT_R10"])
    assert s["R@10"] == pytest.approx(R[3].mean())
    # re-scoring from the checkpoints fills every cell (video is the identity before step 3)
    full = rescore_run(grown, EvalSettings("full"))
    assert set(full["eval_step"]) == {1, 2, 3} and (full["trained_through"] == 0).sum() == len(
        full[full["trained_through"] == 3])


def test_a_changed_earlier_step_is_refused(tiny_cache, protocols, tmp_path):
    p1, _ = protocols
    run = train_one(config(tiny_cache, p1, "vanilla"), tmp_path)
    changed = tmp_path / "changed.toml"
    changed.write_text(P1.replace('dataset = "clotho"\nmodalities = ["text", "audio"]',
                                  'dataset = "clotho"\nmodalities = ["audio", "text"]'))
    before = (run / "config.json").read_bytes()
    with pytest.raises(RunError, match=r"does not extend.*step 2 was clotho:text-audio, now clotho:audio-text"):
        train_one(config(tiny_cache, changed, "vanilla"), tmp_path, resume=True)
    shorter = tmp_path / "shorter.toml"
    shorter.write_text(P1[:P1.index('[[step]]\ndataset = "clotho"')])
    with pytest.raises(RunError, match="the run has 2 steps, the new protocol only 1"):
        train_one(config(tiny_cache, shorter, "vanilla"), tmp_path, resume=True)
    metrics = tmp_path / "metrics.toml"
    metrics.write_text(P1.replace('esc50 = { metrics = ["recall", "acc"] }', 'esc50 = { metrics = ["recall"] }')
                       + '\n[[step]]\ndataset = "vggsound_s"\nmodalities = ["audio", "video"]\n')
    with pytest.raises(RunError, match=r"step 1 \(esc50:text-audio\) scored"):
        train_one(config(tiny_cache, metrics, "vanilla"), tmp_path, resume=True)
    with pytest.raises(RunError, match="differs in epochs, protocol"):  # other fields with the protocol
        cfg = config(tiny_cache, protocols[1], "vanilla")
        train_one(TrainConfig(**{**cfg.to_dict(), "epochs": 2}), tmp_path, resume=True)
    assert (run / "config.json").read_bytes() == before


def test_grow_through_the_cli(tiny_cache, protocols, tmp_path):
    p1, p2 = protocols
    base = ["train", "--features", str(tiny_cache), "--backbone", "synthetic", "--strategy", "vanilla",
            "--runs", str(tmp_path / "runs"), "--epochs", "1", "-q"]
    runner = CliRunner()
    assert runner.invoke(cli, [*base, "--protocol", str(p1)]).exit_code == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(SHORT_PROTOCOL.replace('dataset = "clotho"\nmodalities = ["text", "audio"]',
                                          'dataset = "clotho"\nmodalities = ["audio", "text"]'))
    res = runner.invoke(cli, [*base, "--protocol", str(bad), "--resume"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "does not extend" in res.output
    res = runner.invoke(cli, [*base, "--protocol", str(p2), "--resume"])
    assert res.exit_code == 0, res.output
    run = run_files.run_dir(tmp_path / "runs", "synthetic", "vanilla", 0)
    assert run_files.finished_steps(run) == [0, 1, 2, 3]
