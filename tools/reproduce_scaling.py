#!/usr/bin/env python
"""Progressive scaling, reproduced small on a CPU (the paper's Figures 3 and 4): a TokenFormer grown S -> 2S -> 4S in
parameters by parameter tokens alone, against Transformers of the three sizes from scratch and at the growth stages'
tokens, on the bundled sample (prepared by tools/prepare_sample.sh where it is not yet). The study itself is
tokenformer_mp/scaling.py. Writes results.json, scaling_flops.png (Figure 3) and scaling_stages.png (Figure 4) into
--out; docs/scaling.md shows them.

  python tools/reproduce_scaling.py --out bench_out/scaling
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from tokenformer_mp.config import GROWTH_PRESETS, ConfigError, GrowthRecipe, load_config, validate  # noqa: E402
from tokenformer_mp.scaling import SHAPES, Study, plot, run_study  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("tokenformer-*", "transformer-*", "grown-*")  # what a study writes into --out besides its results and plots


def main(argv=None) -> int:
    d = Study(out="bench_out/scaling")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--steps", type=int, default=d.steps, help="S's steps and every Transformer's from scratch")
    ap.add_argument("--stage-steps", type=int, default=d.stage_steps,
                    help="each growth stage's steps, and the Transformers' at the same tokens")
    ap.add_argument("--eval-interval", type=int, default=d.eval_interval)
    ap.add_argument("--eval-iters", type=int, default=d.eval_iters)
    ap.add_argument("--preset", choices=list(GROWTH_PRESETS), default="preserve", help="the growth recipe")
    ap.add_argument("--transformer-shape", choices=SHAPES, default=d.transformer_shape,
                    help="width: the Transformers widen as the paper's baselines (hidden size, a 4h-like MLP); mlp: "
                         "only their MLP widens, at the TokenFormer's hidden size")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from --out's results.json")
    ap.add_argument("--overwrite", action="store_true", help="delete the runs already in --out and start again")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    out = os.path.abspath(args.out)
    if args.plot_only:
        if not os.path.exists(f"{out}/results.json"):
            print(f"error: --plot-only: no {out}/results.json (run without --plot-only first)", file=sys.stderr)
            return 2
        with open(f"{out}/results.json") as f:
            print("\n".join(plot(json.load(f), out)))
        return 0
    done = sorted(p for pattern in RUNS for p in glob.glob(os.path.join(out, pattern)))
    if done and not args.overwrite:  # each run would resume from its own final checkpoint and train nothing
        print(f"error: {out} already holds runs ({', '.join(map(os.path.basename, done))}): --overwrite starts the "
              "study again, --plot-only redraws its plots", file=sys.stderr)
        return 2
    try:
        validate(load_config(d.tokenformer), check_paths=True)
    except ConfigError:  # the sample's tokenizer and binaries, made once (as tools/quickstart.sh does)
        subprocess.run(["bash", "tools/prepare_sample.sh"], check=True, env={**os.environ, "PY": sys.executable})
    for p in done:
        shutil.rmtree(p)
    os.makedirs(out, exist_ok=True)
    study = Study(out=out, steps=args.steps, stage_steps=args.stage_steps, eval_interval=args.eval_interval,
                  eval_iters=args.eval_iters, recipe=GrowthRecipe(preset=args.preset),
                  transformer_shape=args.transformer_shape)
    results = run_study(study)
    plot(results, out)
    print(json.dumps(results["summary"], indent=1))
    print(f"{results['seconds']:.0f} s; {out}/results.json, scaling_flops.png, scaling_stages.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
