#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) with the settings it wants; arguments pass
# through (e.g. --out=PATH, or --dry for the CPU plan). Run from anywhere:
#
#     benchmarks/gpu_check.sh                  # writes gpu_check.json in the repository root
#     PYTHON=/path/to/python benchmarks/gpu_check.sh --out=/tmp/gpu_check.json
#
# Leave JAX's CPU platform enabled (JAX_PLATFORMS unset, or listing cpu): FLOPs are
# counted on programs compiled for the host CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# One GPU; JAX allocates as it goes instead of taking 75% of the GPU's memory up front,
# so PyTorch in the same process has room.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
