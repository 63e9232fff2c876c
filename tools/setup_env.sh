#!/usr/bin/env bash
# Create .venv and install requirements.txt (idempotent: skipped when requirements.txt is unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
# pip -q still warns about every missing local find-links folder; keep real errors, drop that noise.
pip_install() {
  .venv/bin/pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (2-4 minutes)..."
  # torch first, pinned: DeepSpeed's build imports it, and an unpinned torch would pull a multi-GB CUDA build.
  pip_install "$(grep -E '^torch==' requirements.txt)"
  DS_BUILD_OPS=0 pip_install -r requirements.txt
  echo "$want" > "$stamp"
fi
