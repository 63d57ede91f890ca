"""The GPU benchmark: the paper11 protocol and the encoders' throughput on one device, one JSON.

    benchmarks/gpu.sh [OUT]                                     # one CUDA device, under 10 minutes
    python benchmarks/bench_gpu.py --out OUT                    # the same
    python benchmarks/bench_gpu.py --tiny --device cpu --out OUT  # the same code at a tiny size, on a CPU

What it measures, in one process:

1. protocol: the synthetic cache at paper size (d = 1024, scale 1.0) is written, then vanilla and
   DNS each train one seed of the paper11 protocol with the paper's settings (5 epochs, batch 64,
   AdamW) on ``--device``, scored after every step (the scores' inner products on faiss-gpu when
   the installed faiss sees a GPU and the device is CUDA, else with torch on the CPU, as
   ``cmcl.evaluate.retrieval`` does; the JSON's ``eval_backend`` says which). Per strategy:
   total, training (whole steps), evaluation, updates, ms per update
   (``benchmarks/bench_protocol.py``'s functions). Two short steps of each strategy and one scoring
   (partner_ranks) at the same d first warm the device up (CUDA context, cuBLAS, cuSOLVER, FAISS
   resources); they are not counted.
2. encoders: ImageBind (huge), LanguageBind (large) and UniBind (huge) built with random weights
   (no downloads), in float16 on a CUDA device: items per second per modality through
   ``encode_batch`` on an already preprocessed batch (host-to-device copy, forward, normalisation,
   copy back; decoding and preprocessing excluded), after warm-up, synchronised around the timing.

Everything goes into one JSON (``OUT/bench_gpu.json``) with the device, the versions and the
command, and a short table is printed. ``--device cuda`` on a machine without CUDA stops at once
(exit status 2) instead of measuring the CPU. ``--tiny`` runs the same code at d = 64, scale 0.005
and the tiny random encoders (seconds on a CPU); its numbers only show that the path works.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_gpu.py` from anywhere

from benchmarks.bench_encoders import media  # noqa: E402
from benchmarks.bench_protocol import run_strategy, write_features  # noqa: E402
from cmcl import __version__  # noqa: E402
from cmcl.data.catalog import DATASETS  # noqa: E402
from cmcl.data.protocol import load_protocol  # noqa: E402
from cmcl.extract.encoders import load_encoder  # noqa: E402
from cmcl.extract.synthetic import SyntheticConfig  # noqa: E402
from cmcl.data.paired import PairedFeatures  # noqa: E402
from cmcl.evaluate.retrieval import partner_ranks  # noqa: E402
from cmcl.pipeline import embedder  # noqa: E402
from cmcl.train.config import Harness  # noqa: E402
from cmcl.train.learners import ModalityLearners  # noqa: E402
from cmcl.train.strategies import get_strategy, resolve_params  # noqa: E402
from cmcl.train.strategies.base import Objective  # noqa: E402
from cmcl.train.trainer import fit_step, synchronize  # noqa: E402
from cmcl.types import StepInfo  # noqa: E402

#: the paper's GPU figure for DNS (seconds per step) and the issue's goal for the whole protocol's training
PAPER_DNS_SECONDS_PER_STEP = 36.5
GOAL_TRAIN_SECONDS = 15.0
FULL = {"dim": 1024, "scale": 1.0, "encoder_size": {"imagebind": "huge", "unibind": "huge", "languagebind": "large"},
        "warmup_calls": 2, "min_seconds": 2.0, "min_calls": 3}
TINY = {"dim": 64, "scale": 0.005, "encoder_size": {"imagebind": "tiny", "unibind": "tiny", "languagebind": "tiny"},
        "warmup_calls": 1, "min_seconds": 0.0, "min_calls": 1}
#: items per batch on a GPU: an ImageBind video item is 15 two-frame clips and an audio item 3
#: spectrograms, a LanguageBind video item 8 frames; the rest are single images, texts or signals
BATCH = {"video": 16, "audio": 64, "text": 256, "imu": 256}
BATCH_DEFAULT = 128
TINY_BATCH = 2
ENCODERS = ("imagebind", "languagebind", "unibind")
BATCH_SIZE = 64  # the trainer's batch (TrainConfig default, the paper's)


class UserError(Exception):
    """A problem with the command line: one line on stderr, exit status 2."""


def check_device(name: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, refusing a CUDA device the machine does not have."""
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; nothing was measured "
                            f"(test the benchmark on a CPU with --tiny --device cpu)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def eval_backend(device: str) -> str:
    """Where the evaluation's inner products run: ``faiss-gpu`` (a CUDA device and a faiss that
    sees a GPU: ``faiss.get_num_gpus() > 0``) or ``cpu`` (torch on the CPU)."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return "faiss-gpu" if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources") and gpus > 0 else "cpu"


def machine(device: str) -> dict:
    import faiss

    from cmcl.train.trainer import _git_sha

    info = {"device": device, "torch": torch.__version__, "faiss": faiss.__version__,
            "eval_backend": eval_backend(device), "python": platform.python_version(), "cmcl": __version__,
            "git_sha": _git_sha(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(device_name=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), device_memory_bytes=props.total_memory,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        info["device_name"] = name or platform.processor() or platform.machine()
    return info


def expected_updates(protocol: str, scale: float, epochs: int, batch_size: int = BATCH_SIZE) -> tuple[int, int]:
    """(training pairs, updates) of one run of ``protocol`` on the synthetic cache at ``scale``."""
    cfg = SyntheticConfig(scale=scale)
    sizes = [cfg.sizes(DATASETS[step.dataset])[0] for step in load_protocol(protocol).steps]
    return sum(sizes), sum(epochs * math.ceil(n / batch_size) for n in sizes)


def warm_up(device: str, dim: int, strategies: list[str]) -> float:
    """Two short steps of each strategy and one scoring at width ``dim`` on ``device``, so that
    one-time costs (CUDA context, cuBLAS and cuSOLVER handles, kernel loading, FAISS's GPU
    resources) are not counted in the first measured run; returns the seconds it took."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    steps = [PairedFeatures.from_arrays(*unit_rows(rng, 2, 4 * BATCH_SIZE, dim), ("text", "audio"), i, device=device)
             for i in (1, 2)]
    harness = Harness(lr=1e-4, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)
    for name in strategies:
        learners = ModalityLearners(["text", "audio"], dim, device=device)
        strategy = get_strategy(name, **resolve_params(name, {}, "synthetic"))
        objective = Objective()
        strategy.setup(learners, objective)
        for i, data in enumerate(steps, 1):
            fit_step(learners, strategy, StepInfo(i, "warmup", ("text", "audio"), i), data, harness=harness,
                     epochs=1, batch_size=BATCH_SIZE, objective=objective)
        embed = embedder(learners)
        xq, xb = embed("text", steps[0].xa.cpu().numpy()), embed("audio", steps[0].xb.cpu().numpy())
        partner_ranks(xq, xb, np.arange(len(xq)), 10, use_gpu=device.startswith("cuda"))
    synchronize(torch.device(device))
    return time.perf_counter() - t0


def unit_rows(rng: np.random.Generator, count: int, n: int, dim: int) -> list[np.ndarray]:
    out = []
    for _ in range(count):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def bench_protocol(out: Path, device: str, size: dict, strategies: list[str], epochs: int) -> dict:
    """The protocol part: a warm-up at the same d, then each strategy at ``size``."""
    warmup = warm_up(device, size["dim"], strategies)
    shutil.rmtree(out / "features", ignore_errors=True)  # an existing cache would be kept, not timed
    extract = write_features(out, size["dim"], size["scale"])
    pairs, updates = expected_updates("paper11", size["scale"], epochs)
    result = {"protocol": "paper11", "backbone": "synthetic", "dim": size["dim"], "scale": size["scale"],
              "epochs": epochs, "batch_size": BATCH_SIZE, "seed": 0, "train_pairs": pairs,
              "expected_updates": updates, "warmup_seconds": warmup, "extract_seconds": extract, "strategies": {}}
    for name in strategies:
        r = run_strategy(out, name, epochs=epochs, device=device)
        r["train_seconds_per_step"] = r["train_seconds"] / r["steps"]
        result["strategies"][name] = r
        print(f"  {name}: {r['total_seconds']:.1f} s total, {r['train_seconds']:.1f} s training, "
              f"{r['eval_seconds']:.1f} s evaluation, {r['ms_per_update']:.3f} ms per update", flush=True)
    dns = result["strategies"].get("dns")
    result["goal"] = {
        "train_seconds_target": GOAL_TRAIN_SECONDS,
        "paper_dns_seconds_per_step": PAPER_DNS_SECONDS_PER_STEP,
        "paper_dns_train_seconds": PAPER_DNS_SECONDS_PER_STEP * len(load_protocol("paper11").steps),
        "dns_train_seconds": dns["train_seconds"] if dns else None,
        # judged only where it applies: the full protocol on a GPU
        "met": (dns["train_seconds"] < GOAL_TRAIN_SECONDS) if dns and size is FULL and device.startswith("cuda")
        else None,
    }
    return result


def item_for(modality: str, items: dict):
    """A raw item of ``modality`` from bench_encoders' synthetic media."""
    if modality in ("tactile", "event"):  # image-like modalities: the vision tower's input
        return items["vision"]
    if modality == "imu":
        return np.random.default_rng(0).standard_normal((6, 2000)).astype(np.float32)
    return items[modality]


def time_batches(fn, device: torch.device, *, warmup: int, min_seconds: float, min_calls: int) -> tuple[int, float]:
    """``fn()`` called ``warmup`` times untimed, then until ``min_seconds`` and ``min_calls`` are both
    reached; returns (timed calls, seconds), the device synchronised before and after."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
        if calls >= min_calls:
            synchronize(device)
    synchronize(device)
    return calls, time.perf_counter() - t0


def bench_encoder(name: str, device: str, size: dict, dtype: torch.dtype, tiny: bool, items: dict) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    enc = load_encoder(name, random_weights=size["encoder_size"][name], device=device,
                       fp16=dtype == torch.float16)
    built = time.perf_counter() - t0
    out = {"weights": f"random {size['encoder_size'][name]}", "dtype": str(dtype).removeprefix("torch."),
           "dim": enc.dim, "build_seconds": built, "modalities": {}}
    for m in enc.modalities:
        one = enc.preprocessor(m)(item_for(m, items))
        batch_size = TINY_BATCH if tiny else BATCH.get(m, BATCH_DEFAULT)
        batch = torch.stack([one] * batch_size)
        t0 = time.perf_counter()
        enc.encode_batch(m, batch)  # the first warm-up call (LanguageBind builds a tower on its first batch)
        synchronize(dev)
        first = time.perf_counter() - t0
        calls, seconds = time_batches(lambda: enc.encode_batch(m, batch), dev, warmup=size["warmup_calls"] - 1,
                                      min_seconds=size["min_seconds"], min_calls=size["min_calls"])
        out["modalities"][m] = {"batch": batch_size, "input_shape": list(one.shape), "first_call_seconds": first,
                                "calls": calls, "seconds": seconds, "seconds_per_batch": seconds / calls,
                                "items_per_second": batch_size * calls / seconds}
    if dev.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    del enc
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    rates = ", ".join(f"{m} {r['items_per_second']:.0f}" for m, r in out["modalities"].items())
    print(f"  {name}: {rates} items/s", flush=True)
    return out


def table(result: dict) -> str:
    """The short human summary of a result."""
    m = result["machine"]
    lines = [f"cmcl benchmark on {m['device']} ({m['device_name']}); torch {m['torch']}, faiss {m['faiss']} "
             f"(evaluation on {m['eval_backend']}); {result['mode']} size; {result['wall_seconds']:.0f} s in all"]
    p = result.get("protocol")
    if p:
        lines += [f"protocol {p['protocol']}: synthetic d={p['dim']}, scale {p['scale']}, {p['epochs']} epochs, "
                  f"one seed ({p['train_pairs']} training pairs, {p['expected_updates']} updates expected)",
                  "| strategy | total s | training s | evaluation s | updates | ms per update |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {r['total_seconds']:.1f} | {r['train_seconds']:.2f} | {r['eval_seconds']:.1f} | "
                  f"{r['updates']} | {r['ms_per_update']:.3f} |" for k, r in p["strategies"].items()]
        g = p["goal"]
        if g["dns_train_seconds"] is not None:
            dns = g["dns_train_seconds"]
            verdict = ("not judged: the goal is for the full protocol on a GPU" if g["met"] is None
                       else "met" if g["met"] else "NOT met")
            lines.append(f"DNS training {dns:.2f} s against the goal of < {g['train_seconds_target']:.0f} s: "
                         f"{verdict}; the paper's GPU took "
                         f"{g['paper_dns_seconds_per_step']} s "
                         f"per DNS step, {g['paper_dns_train_seconds']:.0f} s for the protocol "
                         f"({g['paper_dns_train_seconds'] / dns:.1f} times this run)")
    if result.get("encoders"):
        mods = sorted({k for e in result["encoders"].values() for k in e.get("modalities", {})})
        lines += ["encoders (random weights), items per second:",
                  "| encoder | weights | dtype | " + " | ".join(mods) + " |", "|---" * (len(mods) + 3) + "|"]
        for name, e in result["encoders"].items():
            if "error" in e:
                lines.append(f"| {name} | failed: {e['error'][:80]} |")
                continue
            cells = [f"{e['modalities'][k]['items_per_second']:.0f}" if k in e["modalities"] else "" for k in mods]
            lines.append(f"| {name} | {e['weights']} | {e['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the benchmark's cache (OUT/features, replaced), runs (OUT/runs) and JSON "
                         "(default: a temporary folder, removed afterwards, and the JSON in the current folder)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the JSON (default OUT/bench_gpu.json)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="d = 64, scale 0.005, tiny random encoders")
    ap.add_argument("--strategies", default="vanilla,dns", help="comma-separated; empty skips the protocol")
    ap.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated; empty skips the encoders")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--dtype", choices=("auto", "float16", "float32"), default="auto",
                    help="the encoders' dtype; auto: float16 on CUDA, float32 on a CPU")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        device = check_device(args.device)
        strategies = [s for s in args.strategies.split(",") if s]
        encoders = [e for e in args.encoders.split(",") if e]
        unknown = [e for e in encoders if e not in ENCODERS]
        if unknown:
            raise UserError(f"--encoders: unknown {', '.join(unknown)} (choose from {', '.join(ENCODERS)})")
    except UserError as exc:
        print(f"bench_gpu: {exc}", file=sys.stderr)
        return 2
    size = TINY if args.tiny else FULL
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(
        args.dtype, torch.float16 if device.startswith("cuda") else torch.float32)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cmcl-bench-gpu-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        json_path = args.json or (out / "bench_gpu.json" if args.out else Path("bench_gpu.json"))
        result = {"benchmark": "cmcl bench_gpu", "mode": "tiny" if args.tiny else "full",
                  "command": shlex.join([sys.executable, *sys.argv]),
                  "commands": {"protocol": f"python benchmarks/bench_protocol.py --out OUT --dim {size['dim']} "
                                           f"--scale {size['scale']} --strategies {','.join(strategies)} "
                                           f"--epochs {args.epochs} --device {device}",
                               "encoders": "load_encoder(NAME, random_weights=SIZE, device, fp16) then "
                                           "encode_batch(MODALITY, batch), benchmarks/bench_gpu.py::bench_encoder"},
                  "machine": machine(device)}
        json_path.parent.mkdir(parents=True, exist_ok=True)

        def save() -> None:  # after each part, so that a failure later keeps what was measured
            result["wall_seconds"] = time.perf_counter() - start
            json_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

        print(f"bench_gpu: {result['mode']} size on {device} ({result['machine']['device_name']}), "
              f"evaluation on {result['machine']['eval_backend']}", flush=True)
        if strategies:
            print("protocol:", flush=True)
            result["protocol"] = bench_protocol(out, device, size, strategies, args.epochs)
            save()
        failed = []
        if encoders:
            print("encoders:", flush=True)
            result["encoders"] = {}
            with tempfile.TemporaryDirectory() as media_dir:
                items = media(Path(media_dir))
                for name in encoders:
                    try:
                        result["encoders"][name] = bench_encoder(name, device, size, dtype, args.tiny, items)
                    except Exception as exc:  # noqa: BLE001 (one encoder's failure, out of memory say, is recorded)
                        result["encoders"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                        failed.append(name)
                        print(f"  {name}: FAILED ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
                        if device.startswith("cuda"):
                            torch.cuda.empty_cache()
                    save()
        save()
    print(table(result))
    print(f"wrote {json_path}")
    if failed:
        print(f"bench_gpu: {', '.join(failed)} failed (see the JSON)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
