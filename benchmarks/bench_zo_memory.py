"""Peak memory of one training step (protocol step) for ``zo`` against ``vanilla``.

Each configuration runs in a fresh subprocess that builds two learners (text, audio) of width d and
a training set of ``--rows`` pairs, then trains one protocol step (``fit_step``, 1 epoch, batch 64,
AdamW) and reports the peak memory above what was resident just before the step:

* on CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus ``memory_allocated`` at the start (exact tensor bytes);
* on CPU: the kernel's high-water mark ``VmHWM`` (reset through ``/proc/self/clear_refs``) minus
  ``VmRSS`` at the start. ``tracemalloc`` cannot be used on CPU: torch's tensors are allocated by its
  C++ allocator, which ``tracemalloc`` does not see. ``MALLOC_MMAP_THRESHOLD_`` is pinned so that
  freed tensors go back to the kernel and the resident size follows the live tensors.

Every update of a step has the same shape, and the first one also creates AdamW's moments, so the
step's peak is the per-update peak. The script also prints the analytic count of the persistent
training buffers (gradients and AdamW moments) for reference.

Usage::

    python benchmarks/bench_zo_memory.py                    # d = 1024 and 768, CPU, 3 repeats
    python benchmarks/bench_zo_memory.py --device cuda --dims 1024,768
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "vanilla": ("vanilla", {}),
    "zo": ("zo", {}),
    "zo[track_drift=False]": ("zo", {"track_drift": False}),
    "zo[mode=dual]": ("zo", {"mode": "dual"}),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(label: str, dim: int, rows: int, device: str) -> dict:
    """Run one configuration in this process and return its measurements (bytes)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from cmcl.data.paired import PairedFeatures
    from cmcl.train.config import Harness
    from cmcl.train.learners import ModalityLearners
    from cmcl.train.strategies import get_strategy
    from cmcl.train.strategies.base import Objective
    from cmcl.train.trainer import fit_step
    from cmcl.types import StepInfo

    torch.set_num_threads(1)
    name, params = CONFIGS[label]
    harness = Harness(lr=1e-4, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)
    step = StepInfo(1, "bench", ("text", "audio"), 0)

    def build(width: int, n: int):
        rng = np.random.default_rng(0)
        xa = rng.standard_normal((n, width)).astype(np.float32)
        xb = (xa + rng.standard_normal((n, width))).astype(np.float32)
        xa /= np.linalg.norm(xa, axis=1, keepdims=True)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        data = PairedFeatures.from_arrays(xa, xb, ("text", "audio"), 1).to(device)
        learners = ModalityLearners(["text", "audio"], width).to(device)
        strategy = get_strategy(name, **params)
        strategy.setup(learners, Objective())
        return data, learners, strategy

    # Warm-up at a small width: pages in the code paths (lazy library loading shows up in the
    # resident size) so that the measured step only counts its tensors.
    data, learners, strategy = build(32, 128)
    fit_step(learners, strategy, step, data, harness=harness, epochs=1, batch_size=64)
    del data, learners, strategy
    data, learners, strategy = build(dim, rows)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fit_step(learners, strategy, step, data, harness=harness, epochs=1, batch_size=64)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        method = "torch.cuda.max_memory_allocated"
    else:
        Path("/proc/self/clear_refs").write_text("5")     # reset the high-water mark to the current RSS
        start = _status_kb("VmRSS") * 1024
        result = fit_step(learners, strategy, step, data, harness=harness, epochs=1, batch_size=64)
        peak = _status_kb("VmHWM") * 1024 - start
        method = "VmHWM - VmRSS (clear_refs)"
    return {"label": label, "dim": dim, "rows": rows, "device": device, "method": method,
            "peak_bytes": int(peak), "updates": result.updates, "seconds": result.seconds}


def analytic(label: str, dim: int) -> int:
    """Persistent training buffers of the step: .grad + AdamW moments (+ ZO's draw and drift copy)."""
    d_params = dim * dim + dim
    name, params = CONFIGS[label]
    if name == "vanilla":
        return 4 * d_params * (2 + 2 * 2)             # 2 grads, 2 × 2 moments
    if params.get("mode") == "dual":
        zo = 2
        fo = 0
    else:
        zo, fo = 1, 1
    extra = zo * d_params                            # the perturbation z (s·z), one per ZO learner
    extra += 0 if params.get("track_drift") is False else zo * d_params   # CPU copy at step start
    return 4 * (d_params * fo * 3 + extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="1024,768")
    ap.add_argument("--rows", type=int, default=640, help="training pairs (updates = rows / 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the raw measurements here")
    args = ap.parse_args()
    if args.child:
        label, dim = args.child.rsplit("@", 1)
        print(json.dumps(child(label, int(dim), args.rows, args.device)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    rows = []
    for dim in [int(d) for d in args.dims.split(",")]:
        for label in args.configs.split(","):
            peaks = []
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, __file__, "--child", f"{label}@{dim}", "--rows", str(args.rows),
                                      "--device", args.device], env=env, capture_output=True, text=True, check=True)
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                peaks.append(rec["peak_bytes"])
            rows.append({**rec, "peak_bytes": statistics.median(peaks), "peaks": peaks,
                         "analytic_bytes": analytic(label, dim)})
    mib = 1024 ** 2
    print(f"device {args.device}; method {rows[0]['method']}; {args.rows} pairs, batch 64, "
          f"median of {args.repeats} fresh processes")
    print("| d | strategy | peak above start (MiB) | runs (MiB) | vs vanilla | grads+moments+ZO buffers (MiB) |")
    print("|---|---|---|---|---|---|")
    base = {r["dim"]: r["peak_bytes"] for r in rows if r["label"] == "vanilla"}
    for r in rows:
        ratio = f"{100 * (r['peak_bytes'] / base[r['dim']] - 1):+.1f}%" if r["dim"] in base else "n/a"
        runs = ", ".join(f"{p / mib:.1f}" for p in r["peaks"])
        print(f"| {r['dim']} | {r['label']} | {r['peak_bytes'] / mib:.1f} | {runs} | {ratio} | "
              f"{r['analytic_bytes'] / mib:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
