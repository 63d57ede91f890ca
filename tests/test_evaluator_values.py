"""The numbers behind Table 2, checked for value on a tiny hand-built protocol.

Two steps over tiny test splits written with :class:`FeatureWriter`:

* step 1 ``alpha`` (text, audio), 12 pairs: audio rows are the unit vectors e_j, and the text
  learner is the coordinate reversal J, so the text outputs are the rows of a score matrix S
  chosen by hand: a2b (text query) scores are S[i, :], b2a (audio query) scores are S[:, j].
* step 2 ``beta`` (vision, text), 6 pairs: text is the *second* side, so the zero-shot query is
  the vision side (``ua``) here and the audio side (``vb``) in step 1.

``S`` is 1 on the diagonal, 2 at ``S[i, j]`` for ``j < g[i]`` and 0 elsewhere: query i of a2b has
exactly ``g[i]`` candidates above its partner, and query j of b2a has ``c[j] = #{i: g[i] > j}``.
The class prototypes are stored reversed, so the accuracy is right only if they pass through the
text learner.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cmcl.data.features import ShardMeta, shard_path, write_split
from cmcl.data.paired import StepData
from cmcl.data.protocol import load_protocol
from cmcl.evaluate.evaluator import EvalSettings, score
from cmcl.evaluate.report import result_matrix, summarize_run, table2
from cmcl.data import runs as ckpt
from cmcl.pipeline import embedder, report as evaluate_runs, rescore_run
from cmcl.train.learners import ModalityLearners

D = 12
J = np.eye(D)[::-1].copy()          # coordinate reversal: x @ J reverses a row; J is its own inverse

PROTOCOL = """
name = "tiny"
[[step]]
dataset = "alpha"
modalities = ["text", "audio"]
metrics = ["recall", "acc"]

[[step]]
dataset = "beta"
modalities = ["vision", "text"]
metrics = ["recall", "acc"]
"""


def lower_scores(g):
    """1 on the diagonal, 2 at [i, j] for j < g[i] (g[i] <= i), 0 elsewhere."""
    n = len(g)
    S = np.eye(n)
    for i, gi in enumerate(g):
        assert gi <= i
        S[i, :gi] = 2.0
    return S


# step 1: candidates above the partner, per text query (a2b) and per audio query (b2a)
G1 = [0, 0, 0, 0, 1, 1, 5, 5, 6, 9, 10, 11]
C1 = [8, 6, 6, 6, 6, 4, 3, 3, 3, 2, 1, 0]          # C1[j] = #{i: G1[i] > j}
LABELS1 = np.arange(12) % 3
PRED1 = [0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 2, 0]         # 9 of 12 right
# step 2: scores A[i, j] = <vision_i, text_j>; vision queries (a2b) see rows, text queries (b2a) columns
G2 = [0, 1, 0, 2, 3, 5]
C2 = [4, 3, 2, 1, 1, 0]
LABELS2 = np.array([0, 1, 0, 1, 0, 1])
PRED2 = [0, 1, 0, 1, 1, 1]                           # 5 of 6 right


def recall_pct(ranks, k):
    return 100.0 * np.mean(np.asarray(ranks) < k)


# Hand-computed values (percent): (eval_step, direction, metric) -> value
EXPECTED = {
    (1, "a2b", "R@1"): 100 * 4 / 12, (1, "a2b", "R@5"): 100 * 6 / 12, (1, "a2b", "R@10"): 100 * 10 / 12,
    (1, "b2a", "R@1"): 100 * 1 / 12, (1, "b2a", "R@5"): 100 * 7 / 12, (1, "b2a", "R@10"): 100.0,
    (1, "zero-shot", "acc"): 75.0,
    (2, "a2b", "R@1"): 100 * 2 / 6, (2, "a2b", "R@5"): 100 * 5 / 6, (2, "a2b", "R@10"): 100.0,
    (2, "b2a", "R@1"): 100 * 1 / 6, (2, "b2a", "R@5"): 100.0, (2, "b2a", "R@10"): 100.0,
    (2, "zero-shot", "acc"): 100 * 5 / 6,
}
for _s in (1, 2):
    for _k in (1, 5, 10):
        EXPECTED[(_s, "mean", f"R@{_k}")] = 0.5 * (EXPECTED[(_s, "a2b", f"R@{_k}")] + EXPECTED[(_s, "b2a", f"R@{_k}")])
# the alignment score (mean inner product of each pair's outputs) is the diagonal of S and A: all 1
EXPECTED[(1, "mean", "align")] = EXPECTED[(2, "mean", "align")] = 1.0


def one_hot_protos(pred, n_classes):
    """(C, D) prototypes with a 1 at [pred[i], i]: query e_i is closest to class pred[i]."""
    P = np.zeros((n_classes, D))
    P[pred, np.arange(len(pred))] = 1.0
    return P


def write_tiny_cache(root):
    def meta(dataset, mods):
        return ShardMeta(backbone="toy", dataset=dataset, split="test", dim=D, modalities=mods, normalized=False)

    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    S = lower_scores(G1)
    write_split(shard_path(root, "toy", "alpha", "test"), meta("alpha", ("text", "audio")),
                [f"a{i}" for i in range(12)], LABELS1,
                {"text": f32(S @ J), "audio": f32(np.eye(D))},                 # text outputs S @ J @ J = S
                class_names=["c0", "c1", "c2"], class_emb={"text": f32(one_hot_protos(PRED1, 3) @ J)})
    A = lower_scores(G2)
    T = np.zeros((6, D))
    T[:, :6] = A.T                                                            # <e_i, T_j> = A[i, j]
    write_split(shard_path(root, "toy", "beta", "test"), meta("beta", ("vision", "text")),
                [f"b{i}" for i in range(6)], LABELS2,
                {"vision": f32(np.eye(D)[:6]), "text": f32(T @ J)},
                class_names=["d0", "d1"], class_emb={"text": f32(one_hot_protos(PRED2, 2) @ J)})
    return root


@pytest.fixture()
def tiny(tmp_path):
    root = write_tiny_cache(tmp_path / "features")
    proto = tmp_path / "tiny.toml"
    proto.write_text(PROTOCOL)
    return root, proto


def learners_with(text_weight, dim=D, modalities=("text", "audio", "vision")):
    learners = ModalityLearners(modalities, dim)
    with torch.no_grad():
        learners["text"].weight.copy_(torch.as_tensor(text_weight, dtype=torch.float32))
    return learners


def as_dict(rows):
    return {(r["eval_step"], r["direction"], r["metric"]): r["value"] for r in rows}


def test_the_hand_built_scores_have_the_stated_ranks():
    """The construction itself: the rank lists above are what the score matrices give."""
    S, A = lower_scores(G1), lower_scores(G2)
    for M, g, c in ((S, G1, C1), (A, G2, C2)):
        d = np.diag(M)
        assert ((M > d[:, None]).sum(1) == g).all()          # row queries
        assert ((M > d[None, :]).sum(0) == c).all()          # column queries
    assert recall_pct(G1, 5) == pytest.approx(EXPECTED[(1, "a2b", "R@5")])
    assert recall_pct(C2, 1) == pytest.approx(EXPECTED[(2, "b2a", "R@1")])


@pytest.mark.parametrize("recall_protocol", ["paper", "full"])
def test_evaluate_gives_the_hand_computed_recall_and_accuracy(tiny, recall_protocol):
    root, proto = tiny
    protocol = load_protocol(proto)
    tests = StepData(root, "toy", protocol).test_sets()
    rows = score(embedder(learners_with(J)), tests, 2, EvalSettings(recall_protocol))
    got = as_dict(rows)
    assert set(got) == set(EXPECTED)
    for key, want in EXPECTED.items():
        assert got[key] == pytest.approx(want, abs=1e-9), key
    assert {r["trained_through"] for r in rows} == {2}
    by_step = {r["eval_step"]: (r["dataset"], r["pair"]) for r in rows}
    assert by_step == {1: ("alpha", "text-audio"), 2: ("beta", "vision-text")}


def test_accuracy_needs_the_prototypes_through_the_text_learner(tiny):
    """With an identity text learner the stored (reversed) prototypes give other, hand-computed, accuracies."""
    root, proto = tiny
    tests = StepData(root, "toy", load_protocol(proto)).test_sets()
    got = as_dict(score(embedder(learners_with(np.eye(D))), tests, 0, EvalSettings("full")))
    # step 1: audio query e_j meets raw prototype rows P @ J, i.e. class PRED1[11 - j]
    raw_pred = [PRED1[11 - j] for j in range(12)]
    assert raw_pred == [0, 2, 1, 2, 1, 0, 2, 1, 0, 2, 1, 0]
    assert got[(1, "zero-shot", "acc")] == pytest.approx(100 * np.mean(np.equal(raw_pred, LABELS1)))  # 4/12
    assert got[(1, "zero-shot", "acc")] == pytest.approx(100 * 4 / 12)
    # step 2: vision queries e_i (i < 6) score 0 against every reversed prototype: a 2-way tie, 1/2 each
    assert got[(2, "zero-shot", "acc")] == pytest.approx(50.0)


def test_result_matrix_rows_are_training_steps_and_columns_test_splits():
    rows = []
    for i in range(3):
        for j in (1, 2):
            for direction, offset in (("a2b", 100), ("b2a", 200), ("mean", 0)):
                rows.append({"trained_through": i, "eval_step": j, "direction": direction, "metric": "R@10",
                             "value": offset + 10 * i + j})
    rows.append({"trained_through": 2, "eval_step": 1, "direction": "zero-shot", "metric": "acc", "value": 7.0})
    df = pd.DataFrame(rows)
    R = result_matrix(df, "R@10", 2)
    assert R.shape == (3, 2)
    np.testing.assert_array_equal(R, [[1, 2], [11, 12], [21, 22]])
    np.testing.assert_array_equal(result_matrix(df, "R@10", 2, "a2b"), [[101, 102], [111, 112], [121, 122]])
    np.testing.assert_array_equal(result_matrix(df, "R@10", 2, "b2a"), [[201, 202], [211, 212], [221, 222]])
    acc = result_matrix(df, "acc", 2)
    assert acc[2, 0] == 7.0 and np.isnan(acc).sum() == 5


def long_rows(matrices):
    """Long-format rows from {(metric, direction): R} with R[i, j] for trained_through i, eval_step j+1."""
    rows = []
    for (metric, direction), R in matrices.items():
        for (i, j), v in np.ndenumerate(np.asarray(R, dtype=float)):
            if not np.isnan(v):
                rows.append({"trained_through": i, "eval_step": j + 1, "dataset": "d", "pair": "a-b",
                             "direction": direction, "metric": metric, "value": v})
    return pd.DataFrame(rows)


def test_summarize_run_by_hand():
    nan = np.nan
    r10 = [[20, 30, 40], [60, 35, 45], [50, 70, 42], [55, 65, 80]]
    acc = [[10, nan, 15], [50, nan, 12], [45, nan, 20], [40, nan, 60]]
    r1 = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [11, 13, 18]]
    r5 = [[9, 9, 9], [9, 9, 9], [9, 9, 9], [21, 24, 30]]
    df = long_rows({("R@10", "mean"): r10, ("acc", "zero-shot"): acc, ("R@1", "mean"): r1, ("R@5", "mean"): r5,
                    # per-direction rows with other values: only "mean" may enter the summary
                    ("R@10", "a2b"): np.full((4, 3), 99.0), ("R@1", "b2a"): np.zeros((4, 3))})
    s = summarize_run(df, 3)
    assert s["R@10"] == pytest.approx((55 + 65 + 80) / 3)
    assert s["BWT_R10"] == pytest.approx(((55 - 60) + (65 - 70)) / 2)       # R[T, j] - R[j+1, j], j < T-1
    assert s["Acc"] == pytest.approx((40 + 60) / 2)                          # step 2 is not scored
    assert s["BWT_A"] == pytest.approx(40 - 50)
    assert s["R@1"] == pytest.approx((11 + 13 + 18) / 3)
    assert s["R@5"] == pytest.approx((21 + 24 + 30) / 3)


def test_table2_mean_and_sample_std_over_seeds():
    metrics = ("Acc", "BWT_A", "R@1", "R@5", "R@10", "BWT_R10")
    summaries = pd.DataFrame(
        [{"backbone": "toy", "strategy": "dns", "seed": s, **{m: v + k for k, m in enumerate(metrics)}}
         for s, v in ((0, 50.0), (1, 60.0), (2, 76.0))]
        + [{"backbone": "toy", "strategy": "vanilla", "seed": 0, **{m: 5.0 for m in metrics}}])
    t = table2(summaries, ["vanilla", "dns"])
    assert list(t["strategy"]) == ["vanilla", "dns"] and list(t["n"]) == [1, 3]
    dns = t[t["strategy"] == "dns"].iloc[0]
    # values 50, 60, 76 (+k): mean 62, sample variance ((-12)^2 + (-2)^2 + 14^2) / 2 = 172
    for k, m in enumerate(metrics):
        assert dns[f"{m}_mean"] == pytest.approx(62.0 + k)
        assert dns[f"{m}_std"] == pytest.approx(np.sqrt(172.0))
    assert np.sqrt(172.0) != pytest.approx(np.sqrt(344.0 / 3))                # the population std differs
    vanilla = t[t["strategy"] == "vanilla"].iloc[0]
    assert vanilla["Acc_mean"] == 5.0 and vanilla["Acc_std"] == 0.0


# ------------------------------------------------------------------ end to end: runs -> Table 2
def brute_recall(q, c, k):
    """Recall@k (percent) of diagonal partners, ties shared evenly, from the full score matrix."""
    S = q.astype(np.float64) @ c.astype(np.float64).T
    s = np.diag(S)[:, None]
    g, e = (S > s).sum(1), (S == s).sum(1)
    return 100.0 * float(np.mean(np.clip((k - g) / e, 0, 1)))


def brute_acc(q, protos, labels):
    S = q.astype(np.float64) @ protos.astype(np.float64).T
    s = S[np.arange(len(q)), labels][:, None]
    g, e = (S > s).sum(1), (S == s).sum(1)
    return 100.0 * float(np.mean(np.clip((1 - g) / e, 0, 1)))


def brute_step_values(state, test):
    """{metric: value} of one step's test split under learner weights ``state`` (numpy re-implementation)."""
    def out(m, x):
        return x.astype(np.float64) @ state[f"layers.{m}.weight"].T + state[f"layers.{m}.bias"]

    a, b = test.step.modalities
    ua, vb = out(a, test.xa), out(b, test.xb)
    vals = {f"R@{k}": 0.5 * (brute_recall(ua, vb, k) + brute_recall(vb, ua, k)) for k in (1, 5, 10)}
    query = ua if b == "text" else vb
    vals["acc"] = brute_acc(query, out("text", test.class_emb), test.labels)
    return vals


def seeded_learners(seed, step):
    """Step 0: identity; later steps: text = J plus a seeded perturbation of every learner."""
    learners = ModalityLearners(["text", "audio", "vision"], D)
    if step == 0:
        return learners
    gen = torch.Generator().manual_seed(1000 * seed + step)
    with torch.no_grad():
        learners["text"].weight.copy_(torch.as_tensor(J, dtype=torch.float32))
        for p in learners.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return learners


def write_fake_run(runs, root, proto, seed):
    """A finished run folder with known learners per step and *wrong* stored eval rows."""
    run = ckpt.run_dir(runs, "toy", "dns", seed)
    run.mkdir(parents=True)
    cfg = {"features": str(root), "backbone": "toy", "strategy": "dns", "label": "dns", "seed": seed,
           "protocol": str(proto), "recall_protocol": "paper", "pool_size": 1000, "pool_count": 5, "eval_seed": 0}
    header = {"config": cfg, "protocol": {"steps": ["alpha:text-audio", "beta:vision-text"]}}
    ckpt.write_json(run / "config.json", header)
    bogus = [{"trained_through": 0, "eval_step": 1, "dataset": "alpha", "pair": "text-audio", "direction": "mean",
              "metric": "R@10", "value": -1.0}]
    states = []
    for i in range(3):
        learners = seeded_learners(seed, i)
        ckpt.write_step(run, i, learners=learners if i else None, strategy_state=None,
                        eval_rows=[dict(r, trained_through=i) for r in bogus])
        states.append({k: v.double().numpy() for k, v in learners.state_dict().items()})
    return run, states


def test_evaluate_runs_rescored_table2_matches_an_independent_computation(tiny, tmp_path):
    root, proto = tiny
    tests = StepData(root, "toy", load_protocol(proto)).test_sets()
    runs = tmp_path / "runs"
    per_seed = []
    for seed in range(3):
        _, states = write_fake_run(runs, root, proto, seed)
        # R[i][j]: after training step i (row), on the test split of step j + 1 (column)
        R = [[brute_step_values(states[i], tests[j]) for j in range(2)] for i in range(3)]
        per_seed.append({
            "Acc": np.mean([R[2][j]["acc"] for j in range(2)]), "BWT_A": R[2][0]["acc"] - R[1][0]["acc"],
            "R@1": np.mean([R[2][j]["R@1"] for j in range(2)]), "R@5": np.mean([R[2][j]["R@5"] for j in range(2)]),
            "R@10": np.mean([R[2][j]["R@10"] for j in range(2)]),
            "BWT_R10": R[2][0]["R@10"] - R[1][0]["R@10"]})
    # the stored rows say -1 and the config says "paper": asking for "full" re-scores every step
    rep = evaluate_runs(runs, tmp_path / "report" / "table2.csv", recall_protocol="full", plots=False)
    assert len(rep.table) == 1 and rep.table.loc[0, "n"] == 3
    for m in per_seed[0]:
        values = np.array([s[m] for s in per_seed])
        assert rep.table.loc[0, f"{m}_mean"] == pytest.approx(values.mean(), abs=1e-6), m
        assert rep.table.loc[0, f"{m}_std"] == pytest.approx(values.std(ddof=1), abs=1e-6), m
    assert np.std([s["R@10"] for s in per_seed], ddof=1) > 0.5    # the seeds really differ
    assert any(s["BWT_R10"] != 0 for s in per_seed) and any(s["BWT_A"] != 0 for s in per_seed)  # and the steps
    # the long-format results keep each row's step: row 0 is the identity learners
    res = rep.results
    first = res[(res["seed"] == 0) & (res["trained_through"] == 0) & (res["eval_step"] == 1)
                & (res["metric"] == "acc")]["value"]
    assert float(first.iloc[0]) == pytest.approx(brute_step_values(
        {k: v.double().numpy() for k, v in ModalityLearners(["text", "audio", "vision"], D).state_dict().items()},
        tests[0])["acc"], abs=1e-6)
    assert json.loads((runs / "toy" / "dns" / "seed-0" / "config.json").read_text())["config"]["seed"] == 0


def test_stored_eval_rows_are_the_evaluation_of_the_stored_checkpoints(tiny_cache, short_protocol, tmp_path):
    """What training writes in step-NN/eval.csv is row NN: the learners saved after step NN, evaluated."""
    from click.testing import CliRunner

    from cmcl.cli import cli

    r = CliRunner().invoke(cli, ["train", "--features", str(tiny_cache), "--backbone", "synthetic", "--protocol",
                                 str(short_protocol), "--runs", str(tmp_path / "runs"), "--epochs", "1", "-q",
                                 "--strategy", "vanilla", "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = ckpt.run_dir(tmp_path / "runs", "synthetic", "vanilla", 0)
    stored = ckpt.read_eval(run)
    cfg = ckpt.read_json(run / "config.json")["config"]
    settings = EvalSettings(cfg["recall_protocol"], cfg["pool_size"], cfg["pool_count"], cfg["eval_seed"])
    again = rescore_run(run, settings)
    key = ["trained_through", "eval_step", "direction", "metric"]
    merged = stored.merge(again, on=key, suffixes=("_stored", "_again"), validate="one_to_one")
    assert len(merged) == len(stored) == len(again) and sorted(set(stored["trained_through"])) == [0, 1, 2, 3]
    np.testing.assert_allclose(merged["value_stored"], merged["value_again"], atol=1e-4)
    # the rows differ from step to step (training moved the learners), so a shifted row would show
    r10 = result_matrix(stored, "R@10", 3)
    assert not np.allclose(r10[0], r10[3])
    summary = ckpt.read_json(run / "summary.json")
    for m, v in summarize_run(stored, 3).items():
        assert summary[m] == pytest.approx(v, nan_ok=True), m


def test_cli_rescore_replaces_stored_rows_by_a_rescore_of_the_checkpoints(tiny, tmp_path):
    """``cmcl evaluate --rescore`` scores every run again (here its stored rows are wrong on purpose);
    without the flag the stored rows are read as they are."""
    from click.testing import CliRunner

    from cmcl.cli import cli

    root, proto = tiny
    tests = StepData(root, "toy", load_protocol(proto)).test_sets()
    runs = tmp_path / "runs"
    _, states = write_fake_run(runs, root, proto, 0)
    stored = CliRunner().invoke(cli, ["evaluate", "--runs", str(runs), "--report", str(tmp_path / "a.csv"),
                                      "--no-plots", "-q"])
    assert stored.exit_code == 0, stored.output
    assert pd.read_csv(tmp_path / "a.csv").loc[0, "R@10_mean"] == pytest.approx(-1.0)
    again = CliRunner().invoke(cli, ["evaluate", "--runs", str(runs), "--report", str(tmp_path / "b.csv"),
                                     "--no-plots", "-q", "--rescore"])
    assert again.exit_code == 0, again.output
    want = np.mean([brute_step_values(states[2], tests[j])["R@10"] for j in range(2)])
    assert pd.read_csv(tmp_path / "b.csv").loc[0, "R@10_mean"] == pytest.approx(want, abs=1e-3)   # CSV: 4 decimals
    assert (runs / "toy" / "dns" / "seed-0" / "step-02" / "eval.csv").read_text().count("-1.0") == 1  # untouched
