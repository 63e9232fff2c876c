#!/usr/bin/env python
"""Progressive scaling, reproduced small on a CPU (the paper's Fig. 3 and Fig. 6 in miniature).

Four runs on the same data and token budget:
  grown-zero        train a small TokenFormer, grow every Pattention 4x with zero keys (tau pinned), continue;
  grown-zero-frozen the same, with the old tokens frozen after growth (train.old_tokens_lr_mult 0);
  grown-random      the same as grown-zero, but new keys random and tau = sqrt(new n) (the reference's way);
  scratch           the large size from step 0 for the same total steps.
Writes results.json, scaling_flops.png (validation loss against training FLOPs) and scaling_growth.png (the loss
around the moment of growth) into --out.

  python tools/reproduce_scaling.py --out bench_out/scaling   # after tools/quickstart.sh made the sample data
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(overrides: dict) -> list[dict]:
    from tokenformer_mp.parallel.local import run_ranks
    from tokenformer_mp.trainer import train_history
    return run_ranks(1, train_history, "configs/debug.yaml", overrides, timeout=3600)[0]


def plot(results: dict, steps_small: int, f_small: float, small: dict, factor: int, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, hist in results.items():
        v = [r for r in hist if "val_loss" in r]
        ax.plot([r["flops"] for r in v], [r["val_loss"] for r in v], "o-", ms=3, label=name)
    ax.axvline(steps_small * f_small, color="gray", ls=":", label="growth")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title(f"TokenFormer {small} -> x{factor} tokens vs scratch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out}/scaling_flops.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lo, hi = steps_small - 50, steps_small + 100
    for i, name in enumerate(n for n in results if n.startswith("grown")):
        w = [r for r in results[name] if lo <= r["step"] <= hi]
        color = f"C{i}"
        ax.plot([r["step"] for r in w], [r["loss"] for r in w], lw=0.8, alpha=0.45, color=color)
        v = [r for r in w if "val_loss" in r]
        ax.plot([r["step"] for r in v], [r["val_loss"] for r in v], "o-", ms=4, lw=2, color=color, label=name)
    ax.axvline(steps_small, color="gray", ls=":", label="growth")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (thin: training, dots: validation)")
    ax.set_title("loss around growth")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out}/scaling_growth.png", dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/scaling")
    ap.add_argument("--small-tokens", type=int, nargs=3, default=[32, 32, 128], metavar=("QKV", "PROJ", "FFN"))
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--steps-small", type=int, default=400)
    ap.add_argument("--steps-grown", type=int, default=400)
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from --out's results.json")
    ap.add_argument("--overwrite", action="store_true", help="delete the runs already in --out and start again")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    from tokenformer_mp.config import ConfigError, GrowthRecipe, load_config, validate
    from tokenformer_mp.model import flops_per_token
    from tokenformer_mp.reshard import ExpandPlan, reshard

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    small = dict(zip(("qkv", "proj", "ffn"), args.small_tokens))
    large = {k: v * args.factor for k, v in small.items()}
    common = {"train.eval_interval": args.eval_interval, "train.eval_iters": 4, "train.log_interval": 50,
              "checkpoint.save_interval": 0}

    def tokens(t: dict, pinned: dict | None = None) -> dict:
        o = {f"model.{k}_tokens": v for k, v in t.items()}
        o.update({f"model.{k}_scale_tokens": v for k, v in (pinned or {}).items()})
        return o

    total = args.steps_small + args.steps_grown
    cfg = load_config("configs/debug.yaml")
    if not args.plot_only:
        try:  # the sample data before four runs, not inside the first one
            validate(cfg, check_paths=True)
        except ConfigError as e:
            print(f"error: {e} (tools/quickstart.sh makes the sample data)", file=sys.stderr)
            return 2
    tokens_per_step = cfg.train.global_batch(1) * cfg.model.seq_length  # one process

    def flops(t: dict) -> float:
        m = load_config("configs/debug.yaml", {**tokens(t), "model.vocab_size": 4096}).model
        return flops_per_token(m) * tokens_per_step

    if args.plot_only:
        if not os.path.exists(f"{out}/results.json"):
            print(f"error: --plot-only: no {out}/results.json (run without --plot-only first)", file=sys.stderr)
            return 2
        saved = json.load(open(f"{out}/results.json"))
        a = saved["args"]
        small = dict(zip(("qkv", "proj", "ffn"), a["small_tokens"]))
        plot(saved["runs"], a["steps_small"], flops(small), small, a["factor"], out)
        return 0
    grown = (("grown-zero", "zeros", small, 1.0), ("grown-zero-frozen", "zeros", small, 0.0),
             ("grown-random", "normal", None, 1.0))
    names = ["small", "scratch"] + [g[0] for g in grown] + [f"{g[0]}-ckpt" for g in grown]
    done = [f"{out}/{n}" for n in names if os.path.exists(f"{out}/{n}")]
    if done and not args.overwrite:  # each run would resume from its own final checkpoint and train nothing
        print(f"error: {out} already holds runs ({', '.join(map(os.path.basename, done))}): --overwrite starts the "
              "study again, --plot-only redraws its plots", file=sys.stderr)
        return 2
    for r in done:
        shutil.rmtree(r)
    results = {}
    h_small = run({**common, **tokens(small), "train.steps": args.steps_small, "run_dir": f"{out}/small"})
    for name, key_init, pinned, old_mult in grown:
        ck = f"{out}/{name}-ckpt"
        # the reference's way (random keys) also lets tau follow the new token count
        reshard(f"{out}/small/checkpoints", ck, expand=ExpandPlan(large, GrowthRecipe(
                key_init=key_init, tau="pinned" if pinned is not None else "follow")),
                overwrite=True, progress=False)
        h = run({**common, **tokens(large, pinned), "train.steps": args.steps_grown, "checkpoint.load": ck,
                 "train.old_tokens_lr_mult": old_mult, "run_dir": f"{out}/{name}"})
        for r in h:
            r["step"] += args.steps_small
        results[name] = h_small + h
    results["scratch"] = run({**common, **tokens(large), "train.steps": total, "run_dir": f"{out}/scratch"})
    f_small, f_large = flops(small), flops(large)
    for name, hist in results.items():
        for r in hist:
            grown_phase = name == "scratch" or r["step"] > args.steps_small
            steps_small = 0 if name == "scratch" else min(r["step"], args.steps_small)
            r["flops"] = steps_small * f_small + (r["step"] - steps_small) * f_large if grown_phase else r["step"] * f_small
    summary = {name: {"final_val_loss": [r for r in h if "val_loss" in r][-1]["val_loss"],
                      "total_flops": h[-1]["flops"]} for name, h in results.items()}
    pre = [r for r in h_small if "val_loss" in r][-1]["val_loss"]
    for name, *_ in grown:
        first_after = results[name][args.steps_small]  # the first step after growth
        summary[name]["loss_before_growth"] = h_small[-1]["loss"]
        summary[name]["loss_first_step_after"] = first_after["loss"]
        summary[name]["val_before_growth"] = pre
    from tokenformer_mp.fileio import write_atomic
    write_atomic(f"{out}/results.json", json.dumps({"summary": summary, "args": vars(args), "runs": results}, indent=1))

    plot(results, args.steps_small, f_small, small, args.factor, out)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
