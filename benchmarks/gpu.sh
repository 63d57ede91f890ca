#!/usr/bin/env bash
# The GPU benchmark (docs/performance.md, "GPU benchmark"): on one CUDA device, in under 10 minutes,
# the paper11 protocol at paper size for vanilla and DNS and the encoders' fp16 throughput with
# random weights; writes OUT/bench_gpu.json and prints a short table.
#
#   benchmarks/gpu.sh [OUT] [bench_gpu.py options]      OUT defaults to /tmp/cmcl-bench-gpu
#   benchmarks/gpu.sh /tmp/tiny --tiny --device cpu      the same code at a tiny size on a CPU
#
# Run it from the environment cmcl is installed in (python on PATH, or PYTHON=/path/to/python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out=/tmp/cmcl-bench-gpu
if [[ $# -gt 0 && "$1" != -* ]]; then
  out="$1"
  shift
fi
exec "${PYTHON:-python}" "$here/bench_gpu.py" --device cuda --out "$out" "$@"
