#!/usr/bin/env bash
# Create .venv and install requirements.txt (idempotent: skipped when requirements.txt and this script are unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt tools/setup_env.sh | sha256sum | cut -d' ' -f1)
# pip -q still warns about every missing local find-links folder; keep real errors, drop that noise.
pip_install() {
  .venv/bin/pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (4-6 minutes)..."
  # torch first, pinned: DeepSpeed's build imports it, and an unpinned torch would pull a multi-GB CUDA build.
  pip_install "$(grep -E '^torch==' requirements.txt)" setuptools wheel
  DS_BUILD_OPS=0 pip_install -r requirements.txt
  # On a CPU, deepspeed.init_distributed loads DeepSpeed's shared-memory comm op, JIT-compiling it (40 s) unless it
  # was built with DeepSpeed. A run killed during that compile leaves torch's build lock behind, and every later run
  # on the machine waits on it forever (CI's timeout). Build it here, once; GPUs (NCCL) never load it.
  if ! .venv/bin/python -c "$(cat <<'PY'
import sys
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import installed_ops
sys.exit(get_accelerator()._name == "cpu" and not installed_ops.get("deepspeed_shm_comm"))
PY
)" >/dev/null 2>&1; then
    echo "building DeepSpeed's CPU shared-memory op into .venv (2 minutes)..."
    DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip_install --no-build-isolation --no-cache-dir --force-reinstall --no-deps \
      "$(grep -E '^deepspeed==' requirements.txt)"
  fi
  echo "$want" > "$stamp"
fi
