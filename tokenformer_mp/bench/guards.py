"""What the run's guards cost per step: the hang watchdog (train.hang_timeout_s) and the straggler report
(train.straggler_threshold), each on and off, at DP=2 on random tokens (speed ignores content). The straggler report
measures every step here (log_interval 1), its most expensive setting. Runs alternate between the variants, twice
each, so a machine that slows down over the run charges every variant alike."""
from __future__ import annotations

import statistics
import tempfile

from ..config import load_config
from ..parallel.local import run_ranks
from ..trainer import train_history
from .synthetic import FixedVocab, RandomTokens

VARIANTS = {"off": {"train.hang_timeout_s": 0, "train.straggler_threshold": 0},
            "watchdog": {"train.straggler_threshold": 0},
            "straggler report": {"train.hang_timeout_s": 0},
            "both": {}}


def _rank(config: str, overrides: dict) -> list[float]:
    cfg = load_config(config, overrides)
    vocab, t = cfg.model.vocab_size, cfg.train
    data = RandomTokens(4 * t.steps * t.micro_batch_size * (t.grad_accum_steps or 1), cfg.model.seq_length, vocab)
    return [h["step_time_s"] for h in train_history(config, overrides, (data, None), FixedVocab(vocab))]


def measure(name: str, config: str, overrides: dict, steps: int, warmup: int = 2, repeats: int = 2) -> list[dict]:
    times = {v: [] for v in VARIANTS}
    base = {**overrides, "train.steps": steps, "train.eval_interval": 0, "checkpoint.save_interval": 0,
            "train.log_interval": 1, "train.device": "cpu", "train.precision": "fp32"}
    for _ in range(repeats):
        for variant, ov in VARIANTS.items():
            with tempfile.TemporaryDirectory() as run_dir:
                ranks = run_ranks(2, _rank, config, {**base, **ov, "run_dir": run_dir}, timeout=1800)
            times[variant] += [max(step) for step in zip(*ranks)][warmup:]  # a step lasts as long as its slowest rank
    off = statistics.median(times["off"])
    return [{"model": name, "guards": v, "step_ms": 1e3 * statistics.median(ts),
             "vs_off": statistics.median(ts) / off - 1, "steps": len(ts)} for v, ts in times.items()]


def run() -> list[dict]:
    rows = measure("debug", "configs/debug.yaml", {"model.vocab_size": 4096}, steps=12)
    # tokenformer-150m's shapes, a short sequence: a step of seconds on two CPU cores
    rows += measure("150m", "configs/tokenformer-150m.yaml",
                    {"model.seq_length": 128, "train.micro_batch_size": 1, "train.global_batch_size": None,
                     "train.grad_accum_steps": 1, "train.activation_checkpointing": False}, steps=6)
    return rows
