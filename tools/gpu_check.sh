#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py says what it checks). On a node without network, with its own PyTorch:
#   bash tools/gpu_check.sh --python python3 --wheelhouse WHEELS --out OUT [--budget-s 400]
# installs the wheelhouse (tools/make_wheelhouse.sh) into a scratch directory on PYTHONPATH, with pip's index off,
# and runs the check with that Python. Without --python: .venv (tools/setup_env.sh, from the registry) runs it.
# Other arguments (--budget-s, --device cpu, --parts) go to tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
py="" wheels="" out=bench_out/gpu_check rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py=$2; shift 2 ;;
    --wheelhouse) wheels=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -z "$py" ]; then
  [ -z "$wheels" ] || { echo "error: --wheelhouse needs --python (the Python to install it for)" >&2; exit 2; }
  bash tools/setup_env.sh
  exec .venv/bin/python tools/gpu_check.py --out "$out" "${rest[@]}"
fi
command -v "$py" >/dev/null || { echo "error: --python $py: not found" >&2; exit 2; }
"$py" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' \
  || { echo "error: --python $py is Python $("$py" -c 'import platform; print(platform.python_version())'), supported: 3.11, 3.12" >&2; exit 2; }
export PIP_NO_INDEX=1 PYTHONNOUSERSITE=1
if [ -n "$wheels" ]; then
  ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "error: --wheelhouse $wheels holds no .whl (tools/make_wheelhouse.sh)" >&2; exit 2; }
  site=$(mktemp -d "${TMPDIR:-/tmp}/tokenformer_site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site (no index)" | tee -a "$out/log.txt"
  if "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl 2>&1 \
      | tee -a "$out/log.txt"
  else  # a Python without pip: a wheel is a zip of what --target would hold (none of these has scripts to place)
    "$py" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$site" \
      "$wheels"/*.whl
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# not exec: the trap removes the scratch site afterwards
"$py" tools/gpu_check.py --out "$out" "${rest[@]}"
