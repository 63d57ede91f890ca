"""Scoring during training re-embeds only what changed, and reuses the rest exactly."""

from __future__ import annotations

import pandas as pd
import torch

from cmcl import pipeline
from cmcl.data import runs as run_files
from cmcl.data.paired import StepData
from cmcl.data.protocol import load_protocol
from cmcl.evaluate.evaluator import EvalSettings, Scorer, score
from cmcl.pipeline import embedder, rescore_run, train_one
from cmcl.train.config import TrainConfig
from cmcl.train.learners import ModalityLearners

TWO_WORLDS = """
[[step]]
dataset = "nyudv2"
modalities = ["vision", "depth"]

[[step]]
dataset = "esc50"
modalities = ["text", "audio"]

[[step]]
dataset = "clotho"
modalities = ["text", "audio"]
"""


def step_data(cache, tmp_path, protocol: str) -> StepData:
    """The synthetic cache's data for a protocol given as TOML text."""
    path = tmp_path / "p.toml"
    path.write_text(protocol)
    return StepData(cache, "synthetic", load_protocol(str(path)))


def test_scorer_reuses_exactly_the_splits_whose_modalities_did_not_change(tiny_cache, tmp_path):
    data = step_data(tiny_cache, tmp_path, TWO_WORLDS)
    tests = data.test_sets()
    torch.manual_seed(0)
    learners = ModalityLearners(["vision", "depth", "text", "audio"], data.dim)
    scorer = Scorer(tests, EvalSettings("full"))
    scorer(embedder(learners), 0)
    with torch.no_grad():
        learners["text"].weight.add_(0.3 * torch.randn_like(learners["text"].weight))
    rows = scorer(embedder(learners), 1, changed={"text"})
    assert (scorer.computed, scorer.reused) == (3 + 2, 1)  # nyudv2 reused; esc50 and clotho re-scored
    # reused or not, the rows are what scoring from scratch gives
    assert pd.DataFrame(rows).equals(pd.DataFrame(score(embedder(learners), tests, 1, EvalSettings("full"))))
    # a change nobody scores reuses everything; unknown changes (None) re-score everything
    scorer(embedder(learners), 2, changed=set())
    assert scorer.reused == 1 + 3
    scorer(embedder(learners), 3, changed=None)
    assert scorer.computed == 5 + 3


def test_a_re_scored_split_embeds_only_its_changed_modalities(tiny_cache, tmp_path):
    tests = step_data(tiny_cache, tmp_path, TWO_WORLDS).test_sets()
    torch.manual_seed(0)
    learners = ModalityLearners(["vision", "depth", "text", "audio"], tests[0].xa.shape[1])
    calls = []

    def counting(modality, x):
        calls.append(modality)
        return embedder(learners)(modality, x)

    scorer = Scorer(tests, EvalSettings("full"))
    scorer(counting, 0)
    assert sorted(set(calls)) == ["audio", "depth", "text", "vision"]
    calls.clear()
    with torch.no_grad():
        learners["audio"].weight.add_(0.3 * torch.randn_like(learners["audio"].weight))
    rows = scorer(counting, 1, changed={"audio"})
    assert calls == ["audio", "audio"]                    # esc50 and clotho: their text outputs are kept
    assert pd.DataFrame(rows).equals(pd.DataFrame(score(embedder(learners), tests, 1, EvalSettings("full"))))
    calls.clear()
    with torch.no_grad():
        learners["text"].weight.add_(0.3 * torch.randn_like(learners["text"].weight))
    rows = scorer(counting, 2, changed={"text"})
    class_names = sum(ts.step.has_acc and ts.class_emb is not None for ts in tests)
    assert calls == ["text"] * (2 + class_names)          # the two splits' texts (and class names)
    assert pd.DataFrame(rows).equals(pd.DataFrame(score(embedder(learners), tests, 2, EvalSettings("full"))))


def test_training_reuses_rows_and_they_equal_a_rescore_from_checkpoints(tiny_cache, tmp_path, monkeypatch):
    proto = tmp_path / "p.toml"
    proto.write_text(TWO_WORLDS)
    made = []
    real = pipeline.Scorer

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline, "Scorer", spy)
    cfg = TrainConfig(features=str(tiny_cache), backbone="synthetic", strategy="vanilla", protocol=str(proto),
                      epochs=1, batch_size=32)
    run = train_one(cfg, tmp_path / "runs")
    [scorer] = made
    # after step 1 (vision-depth) the two text-audio splits are reused; after steps 2 and 3, nyudv2 is
    assert scorer.reused == 2 + 1 + 1 and scorer.computed == 3 + 1 + 2 + 2
    stored = run_files.read_eval(run)
    again = rescore_run(run, EvalSettings(cfg.recall_protocol, cfg.pool_size, cfg.pool_count, cfg.eval_seed))
    pd.testing.assert_frame_equal(stored.reset_index(drop=True), again[stored.columns].reset_index(drop=True))


ONE_DATASET = """
[[step]]
dataset = "vggsound_s"
modalities = ["text", "audio"]

[[step]]
dataset = "vggsound_s"
modalities = ["audio", "video"]
"""


def test_splits_of_one_dataset_share_the_outputs_of_a_modality(tiny_cache, tmp_path):
    tests = step_data(tiny_cache, tmp_path, ONE_DATASET).test_sets()
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "video"], tests[0].xa.shape[1])
    calls = []

    def counting(modality, x):
        calls.append(modality)
        return embedder(learners)(modality, x)

    scorer = Scorer(tests, EvalSettings())
    rows = scorer(counting, 0)
    # the audio test rows are embedded once for both splits
    assert sorted(calls) == ["audio", "text", "video"]
    assert pd.DataFrame(rows).equals(pd.DataFrame(score(embedder(learners), tests, 0)))
    calls.clear()
    with torch.no_grad():
        learners["audio"].weight.add_(0.3 * torch.randn_like(learners["audio"].weight))
    rows = scorer(counting, 1, changed={"audio"})
    assert calls == ["audio"] and scorer.computed == 2 + 2
    # the same numbers as scoring each split on its own, from scratch
    alone = [r for ts in tests for r in score(embedder(learners), [ts], 1)]
    assert pd.DataFrame(rows).equals(pd.DataFrame(alone))
