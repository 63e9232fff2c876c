"""Build megatron-core's dataset index cache (document, sample and shuffle indices) for a training config, once, in
one process and without a process group: before a job, or as the first step of slurm/pretrain.sbatch. The trainer
then finds it on every rank (and, were it missing, its rank 0 would build it while the others wait, with no
collective timeout). Overrides as for the trainer.

  tokenformer-build-data-cache --config configs/tokenformer-1.5b.yaml --world-size 64 --parallel.tp 2
"""
import argparse
import json
import os
import sys
import time

from ..config import ConfigError, load_config, parse_overrides, validate
from ..data.datasets import build_cache, cache_dir_of, sample_counts
from ..tokenizer import build_tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("SLURM_NTASKS", 1)),
                    help="the job's ranks (default: SLURM_NTASKS, else 1): the data-parallel size follows, and with "
                         "train.grad_accum_steps the number of samples")
    args, rest = ap.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.run_dir:
            overrides["run_dir"] = args.run_dir
        cfg = load_config(args.config, overrides)
        validate(cfg, world_size=args.world_size)
        dp = cfg.parallel.dp(args.world_size)
        start = time.perf_counter()
        build_cache(cfg, dp, build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"cache_dir": cache_dir_of(cfg), "samples": sample_counts(cfg, dp),
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
