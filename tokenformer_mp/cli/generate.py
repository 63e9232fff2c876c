"""Sample text from any checkpoint or export, streaming tokens as they come.

  tokenformer-generate --load runs/debug/checkpoints --prompt "The President" --max-new-tokens 50 --top-p 0.9
"""
import argparse
import sys

import torch

from ..inference import DTYPES, default_dtype, generate, load_model, tokenizer_for


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True)
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-type")
    ap.add_argument("--tokenizer-model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weights and KV cache (default: bf16 on a GPU, else fp32)")
    ap.add_argument("--no-kv-cache", action="store_true", help="re-read the whole context for every token")
    args = ap.parse_args(argv)
    try:
        model, cfg = load_model(args.load, args.device, args.dtype or default_dtype(args.device))
        tok = tokenizer_for(cfg, args.tokenizer_type, args.tokenizer_model)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eod]
    sys.stdout.write(args.prompt)
    out, shown = [], ""
    for t in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                      torch.Generator().manual_seed(args.seed), use_cache=not args.no_kv_cache):
        out.append(t)
        text = tok.decode(out)  # decode the whole tail: byte-level pieces only make sense together
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
