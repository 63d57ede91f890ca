"""The GPU benchmark's own path, run at its tiny size on the CPU in a fresh interpreter.

No GPU is available to the tests: ``--tiny --device cpu`` runs the same code (warm-up, the paper11
protocol for vanilla and DNS, every encoder's modalities) at d = 64 and tiny random encoders. The
numbers are only checked for form and consistency; the update count is recomputed here from the
protocol and the synthetic cache's split sizes.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from cmcl.data.catalog import DATASETS
from cmcl.data.protocol import load_protocol
from cmcl.extract.encoders import ENCODERS, load_encoder
from cmcl.extract.synthetic import SyntheticConfig
from tests.helpers import run_process

SCRIPT = "benchmarks/bench_gpu.py"


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gpu")
    r = run_process([SCRIPT, "--tiny", "--device", "cpu", "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, json.loads((out / "bench_gpu.json").read_text())


def test_tiny_run_writes_the_machine_and_the_command(tiny):
    _, r, result = tiny
    assert result["mode"] == "tiny" and SCRIPT in result["command"] and "--tiny" in result["command"]
    m = result["machine"]
    assert m["device"] == "cpu" and m["eval_backend"] == "cpu" and m["device_name"]
    assert m["torch"] == torch.__version__ and m["faiss"]
    assert "--device cpu" in result["commands"]["protocol"]
    assert positive(result["wall_seconds"]) and result["wall_seconds"] < 120
    assert "| vanilla |" in r.stdout and "| dns |" in r.stdout and "| languagebind |" in r.stdout


def test_tiny_protocol_numbers_are_consistent(tiny):
    out, _, result = tiny
    p = result["protocol"]
    assert (p["protocol"], p["dim"], p["epochs"], p["batch_size"]) == ("paper11", 64, 5, 64)
    sizes = [SyntheticConfig(scale=p["scale"]).sizes(DATASETS[s.dataset])[0] for s in load_protocol("paper11").steps]
    updates = sum(5 * math.ceil(n / 64) for n in sizes)
    assert p["expected_updates"] == updates and p["train_pairs"] == sum(sizes)
    assert positive(p["warmup_seconds"]) and positive(p["extract_seconds"])
    assert set(p["strategies"]) == {"vanilla", "dns"}
    for name, s in p["strategies"].items():
        assert s["steps"] == 11 and s["updates"] == updates
        assert all(positive(s[k]) for k in ("total_seconds", "train_seconds", "eval_seconds", "ms_per_update"))
        assert s["train_seconds"] + s["eval_seconds"] <= s["total_seconds"]
        assert s["ms_per_update"] == pytest.approx(1000 * s["train_seconds"] / s["updates"])
        assert s["train_seconds_per_step"] == pytest.approx(s["train_seconds"] / 11)
        assert set(s["summary"]) and all(math.isfinite(v) for v in s["summary"].values())
        metrics = sorted((out / "runs" / "synthetic" / name).glob("seed-*/step-*/metrics.json"))
        assert len(metrics) == 11
        assert sum(json.loads(f.read_text())["updates"] for f in metrics) == updates
    g = p["goal"]
    assert g["dns_train_seconds"] == p["strategies"]["dns"]["train_seconds"]
    assert g["paper_dns_train_seconds"] == pytest.approx(36.5 * 11) and g["train_seconds_target"] == 15.0
    assert g["met"] is None            # the goal is judged only for the full protocol on a GPU


def test_tiny_encoders_cover_every_modality(tiny):
    _, _, result = tiny
    assert set(result["encoders"]) == {"imagebind", "languagebind", "unibind"}
    for name, e in result["encoders"].items():
        assert e["weights"] == "random tiny" and e["dtype"] == "float32"
        assert set(e["modalities"]) == set(load_encoder(name, random_weights="tiny", device="cpu").modalities)
        for m, r in e["modalities"].items():
            assert r["batch"] == 2 and r["calls"] >= 1 and positive(r["seconds"]) and r["input_shape"]
            assert r["items_per_second"] == pytest.approx(r["batch"] * r["calls"] / r["seconds"])
            assert r["seconds_per_batch"] == pytest.approx(r["seconds"] / r["calls"])
    assert set(result["encoders"]["unibind"]["modalities"]) == set(ENCODERS["unibind"].TOWER_OF)


def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = run_process([SCRIPT, "--device", "cuda", "--out", str(tmp_path / "out")], timeout=120, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "CUDA is not available" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_a_failing_encoder_is_recorded_and_the_others_kept(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_gpu

    real = bench_gpu.load_encoder

    def load(name, **kw):
        if name == "unibind":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(name, **kw)

    monkeypatch.setattr(bench_gpu, "load_encoder", load)
    rc = bench_gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--strategies", "",
                         "--encoders", "imagebind,unibind"])
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert rc == 1 and "protocol" not in result
    assert result["encoders"]["unibind"] == {"error": "RuntimeError: CUDA out of memory (simulated)"}
    assert positive(result["encoders"]["imagebind"]["modalities"]["vision"]["items_per_second"])
    assert "unibind failed" in capsys.readouterr().err
