"""--log tensorboard / --log wandb: thin adapters over the run's own records, read back.

These need the optional extras (``pip install 'cmcl[tensorboard]'``, ``'cmcl[wandb]'``); without
them the tests that use the package skip, saying which extra is missing.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cmcl.cli import cli
from cmcl.loggers import check_loggers, step_records
from cmcl.errors import ConfigError

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason="the tensorboard extra is not installed (pip install 'cmcl[tensorboard]')")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="the wandb extra is not installed (pip install 'cmcl[wandb]')")


def _train(cache, protocol, runs, *extra):
    return CliRunner().invoke(cli, [str(a) for a in ("train", "--features", cache, "--backbone", "synthetic",
                                                     "--protocol", protocol, "--runs", runs, "--epochs", "2",
                                                     "--device", "cpu", "-q", *extra)], catch_exceptions=False)


@needs_tb
def test_tensorboard_events_hold_the_runs_records(tiny_cache, short_protocol, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "dns", "--log", "tensorboard")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "synthetic" / "dns" / "seed-0"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    # every update's loss, numbered over the whole protocol, equal to losses.csv
    losses = pd.concat([pd.read_csv(run / f"step-{i:02d}" / "losses.csv") for i in (1, 2, 3)], ignore_index=True)
    events = acc.Scalars("train/contrastive_loss")
    assert [e.step for e in events] == list(range(len(losses)))
    assert np.allclose([e.value for e in events], losses["contrastive_loss"], rtol=1e-6)
    # per-step metrics and evaluation, at the step index
    m2 = json.loads((run / "step-02" / "metrics.json").read_text())
    sec = {e.step: e.value for e in acc.Scalars("step/train_seconds")}
    assert sec[2] == pytest.approx(m2["train_seconds"], rel=1e-6)
    ev = pd.read_csv(run / "step-03" / "eval.csv").query("metric == 'R@10' and direction == 'mean' and eval_step == 1")
    r10 = {e.step: e.value for e in acc.Scalars("eval/esc50/R@10")}
    assert sorted(r10) == [0, 1, 2, 3] and r10[3] == pytest.approx(float(ev["value"].iloc[0]), rel=1e-6)
    assert "step/o_eta_over_eta" in tags and "train/o_eta_over_eta" in tags
    # the configuration as hyperparameters, beside the event files
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"params.lambda_min": 0.001' in text and '"strategy": "dns"' in text
    hp = EventAccumulator(str(run / "tensorboard" / "hparams"), size_guidance={"scalars": 0})
    hp.Reload()
    summary = json.loads((run / "summary.json").read_text())
    assert hp.Scalars("summary/R@10")[0].value == pytest.approx(summary["R@10"], rel=1e-6)


@needs_wandb
def test_wandb_offline_run_is_written_in_the_run_folder(tiny_cache, short_protocol, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "vanilla", "--log", "wandb")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "synthetic" / "vanilla" / "seed-0"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    files = {p.name for p in offline[0].rglob("*")}
    assert any(f.endswith(".wandb") for f in files)  # the offline record `wandb sync` uploads
    # the run's results still come from its own files
    assert (run / "results.csv").is_file()


def test_step_records_are_the_files(tiny_cache, short_protocol, tmp_path):
    r = _train(tiny_cache, short_protocol, tmp_path / "runs", "--strategy", "vanilla")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "synthetic" / "vanilla" / "seed-0"
    updates, per_step = step_records(run, 2)
    n1 = json.loads((run / "step-01" / "metrics.json").read_text())["updates"]
    losses = pd.read_csv(run / "step-02" / "losses.csv")
    assert [u for u, _ in updates] == list(range(n1, n1 + len(losses)))
    assert [v["train/contrastive_loss"] for _, v in updates] == pytest.approx(losses["contrastive_loss"].tolist())
    assert "eval/clotho/R@10" in per_step and "step/train_seconds" in per_step


def test_unknown_or_missing_logger_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown logger"):
        check_loggers(["mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'cmcl\[wandb\]'"):
        check_loggers(["wandb"])
