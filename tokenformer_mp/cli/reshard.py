"""Move a checkpoint to any TP/PP layout and optionally grow its parameter tokens, streaming one tensor at a time.

  tokenformer-reshard --load runs/x/checkpoints --save ckpt_tp4 --tp 4 --pp 2
  tokenformer-reshard --load ckpt_124m --save ckpt_354m --expand-config configs/tokenformer-354m.yaml
"""
import argparse
import json
import sys

from ..checkpoint import CheckpointError, read_manifest, resolve_source
from ..reshard import ExpandPlan, plan_from_config, plan_from_factor, reshard


def parse_tokens(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        kind, _, n = part.partition("=")
        if kind not in ("qkv", "proj", "ffn") or not n.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected kind=count with kind in qkv, proj, ffn")
        out[kind] = int(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="layout-free checkpoint, DeepSpeed tag dir, or run checkpoints/ dir")
    ap.add_argument("--save", required=True)
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--cp", type=int, help="accepted and ignored: checkpoints do not depend on context parallelism "
                                           "(any checkpoint loads at any --parallel.cp)")
    grow = ap.add_mutually_exclusive_group()
    grow.add_argument("--expand-config", help="grow to the token counts of this config (e.g. tokenformer-354m.yaml)")
    grow.add_argument("--expand-factor", type=float, help="every Pattention's token count times F")
    grow.add_argument("--tokens", type=parse_tokens, help="target counts, e.g. qkv=2140,proj=2140,ffn=8560")
    ap.add_argument("--key-init", choices=["zeros", "normal"], default="zeros",
                    help="new keys: zeros keeps the function exactly (default); normal is the reference's way")
    ap.add_argument("--value-init", choices=["zeros", "normal"], default="normal")
    ap.add_argument("--optimizer", choices=["keep", "reset"], default="keep",
                    help="keep Adam state (new tokens start at zero) or reset all of it (the paper's recipe)")
    ap.add_argument("--allow-shrink", action="store_true", help="allow dropping trained tokens")
    ap.add_argument("--no-pin-tau", action="store_true",
                    help="let tau follow the new token count (the reference's growth; changes the function)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.cp is not None:
        print(f"--cp {args.cp}: ignored, checkpoints do not depend on context parallelism (train with "
              f"--parallel.cp {args.cp})", file=sys.stderr)
    try:
        src = resolve_source(args.load)
        plan = None
        if args.expand_config or args.expand_factor is not None or args.tokens:
            model = read_manifest(src)["model"]
            if args.expand_config:
                tokens = plan_from_config(args.expand_config)
            elif args.expand_factor is not None:
                tokens = plan_from_factor(model, args.expand_factor, args.allow_shrink)
            else:
                tokens = args.tokens
            plan = ExpandPlan(tokens, args.key_init, args.value_init, args.allow_shrink, not args.no_pin_tau)
        new = reshard(src, args.save, args.tp, args.pp, plan, args.optimizer, args.seed, args.overwrite)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, layout = new["model"], new["history"][-1]["target_layout"]
    pattentions = ("qkv", "proj", "ffn") if m.get("arch", "tokenformer") == "tokenformer" else ()
    print(json.dumps({"saved": args.save, "layout": layout,
                      "tokens": {k: m[f"{k}_tokens"] for k in pattentions}, "step": new["step"],
                      "optimizer": new["optimizer"] is not None, "grown_from": new.get("grown_from")}))
    # what the training config must say to load it (a mismatch is refused, naming the keys)
    keys = [f"--model.{k} {m[k]}" for kind in pattentions
            for k in (f"{kind}_tokens", f"{kind}_scale_tokens") if m[k] is not None]
    print(f"continue with: python -m tokenformer_mp.train --config YOUR.yaml --checkpoint.load {args.save} "
          f"--parallel.tp {layout['tp']} --parallel.pp {layout['pp']}"
          + (f" --parallel.cp {args.cp}" if args.cp else "") + f" {' '.join(keys)}"
          + (" [--train.old_tokens_lr_mult 0 to freeze the old tokens]" if new.get("grown_from") else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
