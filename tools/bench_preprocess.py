"""Compare preprocess() throughput with the bare tokenizer's on the same documents and number of processes.

    python tools/bench_preprocess.py --input '../shared/data/minipile/train-0000[01].jsonl.zst' \
        --tokenizer-type HFTokenizer --tokenizer-model ../shared/tokenizers/gpt-neox-20b/tokenizer.json --workers 2
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package
warnings.filterwarnings("ignore", message="Transformer Engine and Apex")  # megatron-core's import-time notice

from tokenformer_mp.data.bench import benchmark_preprocessing  # noqa: E402
from tokenformer_mp.tokenizer import TOKENIZER_TYPES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns (quote them)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-docs", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    r = benchmark_preprocessing(a.input, a.tokenizer_type, a.tokenizer_model, a.workers, a.max_docs, a.batch_size,
                                a.repeats)  # fmt: skip
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
