#!/usr/bin/env bash
# The README's first command: set up .venv, train a tokenizer on the bundled sample, preprocess it into indexed
# binaries, and train the debug TokenFormer (CPU, or one GPU when present). Extra arguments go to the trainer,
# e.g. bash tools/quickstart.sh --train.steps 50
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
if [ ! -f data/tokenizer/sample.model ]; then
  $PY tools/train_tokenizer.py --input data/sample/train.jsonl.zst --model-prefix data/tokenizer/sample --vocab-size 4000
fi
if [ ! -f data/processed/sample_text_document.idx ]; then
  $PY tools/preprocess_data.py --input data/sample/train.jsonl.zst --output-prefix data/processed/sample \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/sample.model --append-eod --workers 2
fi
exec $PY -m tokenformer_mp.train --config configs/debug.yaml "$@"
