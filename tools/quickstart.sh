#!/usr/bin/env bash
# The README's first command: set up .venv, train a tokenizer on the bundled sample, preprocess it into indexed
# binaries (tools/prepare_sample.sh), and train the debug TokenFormer (CPU, or one GPU when present). Extra arguments
# go to the trainer, e.g. bash tools/quickstart.sh --train.steps 50
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python bash tools/prepare_sample.sh
exec .venv/bin/python -m tokenformer_mp.train --config configs/debug.yaml "$@"
