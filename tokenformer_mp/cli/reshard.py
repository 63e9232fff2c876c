"""Move a checkpoint to any TP/PP layout and optionally grow its parameter tokens, streaming one tensor at a time.

  tokenformer-reshard --load runs/x/checkpoints --save ckpt_tp4 --tp 4 --pp 2
  tokenformer-reshard --load ckpt_124m --save ckpt_354m --expand-config configs/tokenformer-354m.yaml
  tokenformer-reshard --load ckpt_124m --save ckpt_354m --expand-factor 2 --recipe reference --noise-std 0.01

Growth follows a recipe (docs/checkpoints.md): the --expand-config file's `growth:` section, else --recipe's preset;
each recipe flag below overrides one of its keys.
"""
import argparse
import dataclasses
import json
import sys

from ..checkpoint import CheckpointError, read_manifest, resolve_source
from ..config import GROWTH_STAGE_KEYS, ConfigError, GrowthRecipe, check_growth, load_config
from ..reshard import ExpandPlan, plan_from_config, plan_from_factor, reshard

# recipe key -> its flag here (the stage's schedule keys read as what they are on this tool's command line)
FLAGS = {"preset": "--recipe", **{k: f"--stage-{k.replace('_', '-')}" for k in GROWTH_STAGE_KEYS}}


def flag(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def recipe_from(args, config_path: str | None) -> GrowthRecipe:
    """The --expand-config file's growth section (if any), each recipe flag given overriding its key; refused by
    the flag's name, or by the file's key."""
    base = load_config(config_path).growth if config_path else GrowthRecipe()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GrowthRecipe)
             if getattr(args, f.name) is not None}
    recipe = dataclasses.replace(base, **given)
    check_growth(recipe, lambda key: flag(key) if key in given else f"{config_path}: growth.{key}")
    return recipe


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
    ap.add_argument("--optimizer", help="keep Adam state (new tokens start at zero; the default) or reset all of it "
                                        "(the paper's recipe)")
    ap.add_argument("--allow-shrink", action="store_true", help="allow dropping trained tokens")
    ap.add_argument("--overwrite", action="store_true")
    rec = ap.add_argument_group("growth recipe (unset: the --expand-config file's growth section, else the preset)")
    rec.add_argument("--recipe", dest="preset", help="preserve (the default: the function is kept) or reference "
                                                     "(the paper's code: random new tokens, tau follows n)")
    rec.add_argument("--key-init", help="new key tokens: zeros (keeps the function) or normal")
    rec.add_argument("--key-std", type=float, help="std of normal new keys (default: model.init_std)")
    rec.add_argument("--value-init", help="new value tokens: zeros or normal")
    rec.add_argument("--value-std", type=float, help="std of normal new values (default: 2 / layers / sqrt(hidden))")
    rec.add_argument("--noise-std", type=float, help="Gaussian noise added to the old tokens (default 0)")
    rec.add_argument("--noise", help="relative (--noise-std times each tensor's std; the default) or absolute")
    rec.add_argument("--tau", help="pinned (tau stays sqrt(old n): the function is kept) or follow (sqrt(new n))")
    rec.add_argument("--no-pin-tau", dest="tau", action="store_const", const="follow", help="the same as --tau follow")
    rec.add_argument("--seed", type=int, help="of the new tokens and the noise (default 0)")
    rec.add_argument("--stage-lr", dest="lr", type=float, help="the new stage's peak LR (default: train.lr)")
    rec.add_argument("--stage-min-lr", dest="min_lr", type=float, help="its final LR (default: train.min_lr)")
    rec.add_argument("--stage-warmup-steps", dest="warmup_steps", type=int,
                     help="its warmup (default: train.warmup_steps)")
    rec.add_argument("--stage-steps", dest="steps", type=int,
                     help="its cosine's length: min_lr from this step after growth on (default: train.steps)")
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
            plan = ExpandPlan(tokens, recipe_from(args, args.expand_config), args.allow_shrink)
        else:
            stray = [f.name for f in dataclasses.fields(GrowthRecipe)
                     if f.name != "optimizer" and getattr(args, f.name) is not None]
            if stray:
                raise ConfigError(f"{flag(stray[0])}: a growth recipe setting, but nothing grows: add --expand-config, "
                                  f"--expand-factor or --tokens")
            if args.optimizer not in (None, "keep", "reset"):
                raise ConfigError(f"--optimizer: {args.optimizer!r}: keep or reset")
        new = reshard(src, args.save, args.tp, args.pp, plan, None if plan else args.optimizer,
                      overwrite=args.overwrite)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, layout = new["model"], new["history"][-1]["target_layout"]
    pattentions = ("qkv", "proj", "ffn") if m.get("arch", "tokenformer") == "tokenformer" else ()
    print(json.dumps({"saved": args.save, "layout": layout,
                      "tokens": {k: m[f"{k}_tokens"] for k in pattentions}, "step": new["step"],
                      "optimizer": new["optimizer"] is not None, "grown_from": new.get("grown_from"),
                      "growth": new.get("growth")}))
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
