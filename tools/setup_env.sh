#!/usr/bin/env bash
# Create .venv and install requirements.txt (idempotent: skipped when requirements.txt is unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (about a minute)..."
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned: DeepSpeed's build imports it, and an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q "$(grep -E '^torch==' requirements.txt)"
  DS_BUILD_OPS=0 .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
