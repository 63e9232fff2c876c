#!/usr/bin/env bash
# The GPU check: set up .venv if needed, then run tools/gpu_check.py (tests/test_gpu.py + the GPU benchmarks, one
# JSON in bench_out/gpu_check.json). Arguments go to it, e.g. bash tools/gpu_check.sh --budget-s 300
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python tools/gpu_check.py "$@"
