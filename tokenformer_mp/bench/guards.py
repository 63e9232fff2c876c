"""What the run's guards cost per step: the hang watchdog (train.hang_timeout_s), the straggler report
(train.straggler_threshold, measuring every step here: log_interval 1, its most expensive setting) and the spike guard
(train.spike_*), all on, at DP=2 on random tokens (speed ignores content).

Each guard's own calls are timed inside the training run (perf_counter around every method the trainer calls on
it, the straggler report's device synchronisation and gather included), as a share of the step time. Timing whole runs
with the guards on and off instead measured ±30% apart on this shared 2-core machine, run to run: far above the
1% to be shown.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict

from ..config import load_config
from ..parallel.local import run_ranks
from ..spike_guard import SpikeGuard
from ..straggler import StragglerReport
from ..trainer import Trainer, train_history
from ..watchdog import HangWatchdog
from .synthetic import FixedVocab, RandomTokens

# (class, the methods the trainer calls on it) per guard; the trainer's own spike hooks judge inside DeepSpeed's step
GUARDS = {"watchdog": [(HangWatchdog, ("arm", "disarm", "forward_started"))],
          "straggler report": [(StragglerReport, ("begin", "ready", "gather"))],
          "spike guard": [(Trainer, ("_skip_if_spike", "_restore_lr")), (SpikeGuard, ("record", "must_roll_back"))]}


def _timed(fn, spent: dict, label: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
    return wrapper


def _rank(config: str, overrides: dict) -> dict:
    spent = defaultdict(float)
    for label, targets in GUARDS.items():
        for cls, methods in targets:
            for name in methods:
                setattr(cls, name, _timed(getattr(cls, name), spent, label))
    cfg = load_config(config, overrides)
    vocab, t = cfg.model.vocab_size, cfg.train
    data = RandomTokens(4 * t.steps * t.micro_batch_size * (t.grad_accum_steps or 1), cfg.model.seq_length, vocab)
    history = train_history(config, overrides, (data, None), FixedVocab(vocab))
    return {"step_s": sum(h["step_time_s"] for h in history), "steps": len(history), **spent}


def measure(name: str, config: str, overrides: dict, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as run_dir:
        ranks = run_ranks(2, _rank, config, {**overrides, "train.steps": steps, "train.eval_interval": 0,
                                             "checkpoint.save_interval": 0, "train.log_interval": 1,
                                             "train.device": "cpu", "train.precision": "fp32", "run_dir": run_dir},
                          timeout=1800)
    step_ms = 1e3 * statistics.mean(r["step_s"] / r["steps"] for r in ranks)
    return [{"model": name, "guard": label, "step_ms": step_ms,
             "guard_ms_per_step": 1e3 * max(r[label] / r["steps"] for r in ranks),
             "share_of_step": max(r[label] / r["step_s"] for r in ranks)} for label in GUARDS]


def run() -> list[dict]:
    rows = measure("debug", "configs/debug.yaml", {"model.vocab_size": 4096}, steps=20)
    # tokenformer-150m's shapes, a short sequence: a step of seconds on two CPU cores
    rows += measure("150m", "configs/tokenformer-150m.yaml",
                    {"model.seq_length": 128, "train.micro_batch_size": 1, "train.global_batch_size": None,
                     "train.grad_accum_steps": 1, "train.activation_checkpointing": False}, steps=6)
    return rows
