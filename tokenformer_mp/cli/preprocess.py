"""Tokenize Pile-format .jsonl/.jsonl.zst files into megatron-core indexed datasets ({prefix}_{key}_document.bin/.idx).

    tokenformer-preprocess --input 'data/sample/train.jsonl.zst' --output-prefix data/processed/sample \
        --tokenizer-type HFTokenizer --tokenizer-model tokenizers/gpt-neox-20b/tokenizer.json --workers 2
"""
import argparse
import logging
import os
import sys

from ..data.preprocess import preprocess
from ..tokenizer import TOKENIZER_TYPES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns (quote them)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=True)
    p.add_argument("--tokenizer-model", required=True, help="tokenizer.json or SentencePiece .model file")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True, help="end documents with EOD")
    p.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                   help="tokenizer processes, besides the reading one (default: cores - 1, so the reader has one)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per batch sent to a worker")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--allow-truncated", action="store_true",
                   help="keep the documents before the damage in a truncated or corrupt .zst input (else an error)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = preprocess(
            a.input, a.output_prefix, a.tokenizer_type, a.tokenizer_model, json_keys=a.json_keys,
            append_eod=a.append_eod, workers=a.workers, strict=a.strict, overwrite=a.overwrite,
            batch_size=a.batch_size, max_docs=a.max_docs, allow_truncated=a.allow_truncated,
        )  # fmt: skip
    except (FileExistsError, ValueError) as e:  # bad input (BadLine is a ValueError): no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing input, a read-only output directory, a full disk: the path and the cause
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{s['docs']} docs, {s['tokens']} tokens, {s['bad_lines']} bad lines, "
        f"{s['tokens'] / s['seconds']:,.0f} tokens/s ({s['bytes'] / 1e6 / s['seconds']:.1f} MB/s) "
        f"-> {', '.join(s['outputs'].values())}"
    )
    for damage in s["damaged"]:
        print(f"truncated input (--allow-truncated): {damage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
