#!/usr/bin/env bash
# An offline wheelhouse for a GPU node that has its own PyTorch and no network (run it where the registry is
# reachable, carry DIR to the node, then: bash tools/gpu_check.sh --python python3 --wheelhouse DIR --out OUT).
#
#   bash tools/make_wheelhouse.sh --python-version 3.12 --out DIR
#
# It holds exactly what such a node lacks for training, the tests and the GPU check: DeepSpeed (a pure-Python wheel
# built from its source release with no ops prebuilt: the node JIT-builds any it needs), megatron-core, pydantic and
# its parts, hjson, zstandard. Nothing the node has: no torch, no nvidia-*, no triton (docs/training.md, air-gapped).
# The versions are requirements.txt's where it names them.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (--python-version X.Y --out DIR)" >&2; exit 2 ;;
  esac
done
case "$pyver" in
  3.11|3.12) ;;
  *) echo "error: --python-version must be 3.11 or 3.12 (the supported Pythons), got '${pyver}'" >&2; exit 2 ;;
esac
[ -n "$out" ] || { echo "error: --out DIR is required" >&2; exit 2; }

pin() { grep -E "^$1==" requirements.txt | cut -d' ' -f1; }
# pydantic pins its core's exact version; typing-extensions because pydantic needs a newer one than torch does.
binary=("$(pin megatron-core)" "$(pin zstandard)" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0)
stage=$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tag=${pyver/./}
echo "downloading ${#binary[@]} wheels for CPython $pyver (manylinux x86_64)..."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --abi "cp$tag" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$stage" "${binary[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# DeepSpeed's setup.py imports torch: build in the project's .venv (tools/setup_env.sh), no ops compiled in.
bash tools/setup_env.sh
echo "building $(pin deepspeed) into a wheel (no ops prebuilt)..."
DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed \
  -w "$stage" "$(pin deepspeed)" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
ls "$stage"/deepspeed-*-py3-none-any.whl >/dev/null  # a platform wheel would mean ops were compiled in

mkdir -p "$out"
rm -f "$out"/*.whl
mv "$stage"/*.whl "$out"/
echo "wheelhouse $out: $(ls "$out"/*.whl | wc -l) wheels, $(du -sm "$out" | cut -f1) MiB"
ls -1 "$out"
