"""The time the training loop waits for its input, with the next steps' micro-batches assembled ahead by a
background thread (data.prefetch_steps) and without: the debug config on its real data (megatron-core's GPT dataset
reading the indexed binaries), one process."""
from __future__ import annotations

import statistics
import tempfile

from ..parallel.local import run_ranks
from ..trainer import train_history


def measure(config: str, overrides: dict, steps: int = 40, warmup: int = 5) -> list[dict]:
    rows = []
    for prefetch in (0, 2):
        with tempfile.TemporaryDirectory() as run_dir:
            hist = run_ranks(1, train_history, config, {**overrides, "train.steps": steps, "train.eval_interval": 0,
                                                        "checkpoint.save_interval": 0, "data.prefetch_steps": prefetch,
                                                        "run_dir": run_dir})[0][warmup:]
        wait = statistics.median(h["input_wait_s"] for h in hist)
        step = statistics.median(h["step_time_s"] for h in hist)
        rows.append({"prefetch_steps": prefetch, "input_wait_ms": 1e3 * wait, "step_time_ms": 1e3 * step,
                     "wait_share": wait / step})
    return rows
