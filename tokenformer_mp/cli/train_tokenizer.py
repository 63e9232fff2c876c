"""Train a SentencePiece BPE tokenizer on Pile-format .jsonl/.jsonl.zst files: writes {prefix}.model and .vocab.

    tokenformer-train-tokenizer --input 'data/sample/train.jsonl.zst' --model-prefix data/tokenizer/sp8k \
        --vocab-size 8000
"""
import argparse
import logging
import sys

from ..data.train_tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns (quote them)")
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="train on at most this many lines")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = train_tokenizer(
            a.input, a.model_prefix, a.vocab_size, json_keys=a.json_keys, max_sentences=a.max_sentences,
            character_coverage=a.character_coverage, threads=a.threads, overwrite=a.overwrite,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
