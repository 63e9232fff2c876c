"""python -m tokenformer_mp.train --config FILE [--run-dir DIR] [--section.key VALUE ...]

The command line of the trainer (tokenformer_mp.trainer): parse, check the config, train, and exit with a code a job
script can act on: 0 done, 2 bad input (config, data, checkpoint), 3 diverged, 4 hung (the watchdog), 124 stopped by
a signal after a checkpoint (requeue). One code path for every layout: one CPU process, one GPU, or TP x PP x DP
ranks under any launcher.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch.distributed as dist

from .checkpoint import CheckpointError
from .config import ConfigError, load_config, parse_overrides, validate


def quiet_libraries() -> None:
    """The libraries' INFO lines (megatron-core's some 30 index-cache lines, the compiler probes of DeepSpeed's op
    builders) off the console, the project's own and every warning kept. DeepSpeed's own logger does not propagate
    and sets its level when imported: a filter, which it keeps."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("tokenformer_mp").setLevel(logging.INFO)
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    ap.add_argument("--verbose", action="store_true",
                    help="the libraries' INFO lines too (megatron-core's dataset builder, DeepSpeed's engine)")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    if not args.verbose:
        quiet_libraries()
    try:
        overrides = parse_overrides(rest)
        if args.run_dir:
            overrides["run_dir"] = args.run_dir
        cfg = load_config(args.config, overrides)
        validate(cfg, check_paths=True, check_env=True)
        # Here, once the config is known good: DeepSpeed and megatron-core take 4 s to import (measured, 2 cores),
        # which a mistyped key should not cost.
        from .trainer import Trainer, TrainingDiverged
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError) as e:  # LaunchError is a ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
    # found at load time (a bad checkpoint, or rules it cannot satisfy) or in training (input that cannot be read:
    # DataError, a ConfigError)
    except (ConfigError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():  # not left to the interpreter's exit (CI saw it abort once); no barrier: the
            dist.destroy_process_group()  # other ranks may have stopped elsewhere
        return 3 if isinstance(e, TrainingDiverged) else 2
    if trainer.is_logger and result:
        print(json.dumps({k: result[k] for k in ("step", "loss", "val_loss") if k in result}))
    stopped = trainer._stop_signal is not None and trainer.step < cfg.train.steps  # a late signal: done anyway
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 124 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
