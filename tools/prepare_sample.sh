#!/usr/bin/env bash
# The bundled sample made ready for configs/debug.yaml and configs/transformer-debug.yaml: a 4k SentencePiece
# tokenizer trained on it, and it preprocessed into indexed binaries; a step whose output exists is skipped.
# tools/quickstart.sh and tools/reproduce_scaling.py run it. PY: the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ ! -f data/tokenizer/sample.model ]; then
  $PY tools/train_tokenizer.py --input data/sample/train.jsonl.zst --model-prefix data/tokenizer/sample --vocab-size 4000
fi
if [ ! -f data/processed/sample_text_document.idx ]; then
  $PY tools/preprocess_data.py --input data/sample/train.jsonl.zst --output-prefix data/processed/sample \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/sample.model --append-eod --workers 2
fi
