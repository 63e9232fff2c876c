"""Loss and perplexity of a checkpoint on an indexed dataset (prefix) or a .jsonl(.zst) file, as one JSON line.

  tokenformer-evaluate --load runs/debug/checkpoints --data data/sample/val.jsonl.zst --max-docs 100
"""
import argparse
import json
import os
import sys

import torch

from ..inference import DTYPES, default_dtype, documents, evaluate, load_model, tokenizer_for


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint dir (trainer's, resharded) or an export dir")
    ap.add_argument("--data", required=True, help="indexed dataset prefix, or a .jsonl / .jsonl.zst file")
    ap.add_argument("--max-docs", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokenizer-type")
    ap.add_argument("--tokenizer-model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weights (default: bf16 on a GPU, else fp32); the loss is "
                    "summed in fp32 either way")
    args = ap.parse_args(argv)
    try:
        model, cfg = load_model(args.load, args.device, args.dtype or default_dtype(args.device))
        tok = None if os.path.exists(args.data + ".idx") else tokenizer_for(cfg, args.tokenizer_type, args.tokenizer_model)
        result = evaluate(model, documents(args.data, tok, args.max_docs), args.batch_size)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
