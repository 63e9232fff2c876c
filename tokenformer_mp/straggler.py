"""The straggler report: which rank sets the pace of the job.

In synchronous training a slow rank makes every other rank wait in the step's next collective, so step times are the
same everywhere and name nobody. What differs is how long each rank takes to become ready for the step's gradient
reduction: its own work (the input, every forward, every backward but the last), timed from the step's start, where
the ranks leave the previous step boundary's collective together. Every log interval one step is measured so (the
device synchronised once, before the last backward: no change to the maths), and each rank's step time, input wait and
ready time go to global rank 0. The rank furthest behind the others' median is named, with its host and lag; it is a
straggler when the lag is over train.straggler_threshold of the median step time. Every rank's figures go to
RUN/ranks.jsonl.

Under TP or CP a slow rank holds up its group inside the forward, so the report names a rank of that group. At PP > 1
DeepSpeed's pipeline schedule runs the whole step: step time and input wait are gathered, and no rank is named.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist


class StragglerReport:
    def __init__(self, run_dir: str, device: torch.device, rank: int, world: int, interval: int, threshold: float,
                 has_ready_point: bool):
        """interval: measure every this many steps (the log interval); threshold 0 or a world of one: off."""
        self.enabled = threshold > 0 and world > 1
        self.device, self.rank, self.world, self.interval, self.threshold = device, rank, world, interval, threshold
        self.has_ready_point, self.path = has_ready_point, os.path.join(run_dir, "ranks.jsonl")
        self.hosts: list[str] = []
        self._start, self._ready = None, math.nan
        if self.enabled:
            self.hosts = [None] * world
            dist.all_gather_object(self.hosts, socket.gethostname())

    def begin(self, step: int, start: float) -> None:
        """Step `step` (1-based) starts, at perf_counter time `start`: measured when it ends a log interval."""
        measured = self.enabled and step % self.interval == 0
        self._start, self._ready = (start if measured else None), math.nan

    def ready(self) -> None:
        """This rank's work before the step's gradient reduction is done (called before the last backward)."""
        if self._start is not None and self.has_ready_point:
            if self.device.type != "cpu":  # the device's queue, not the host's, says when the work is done
                torch.accelerator.synchronize()
            self._ready = time.perf_counter() - self._start

    def gather(self, step: int, step_time: float, input_wait: float) -> dict:
        """Collective on a measured step (no-op otherwise): every rank's figures to rank 0, which returns the slowest
        rank's (slowest_rank, slowest_host, slowest_lag_s, straggler) for the step's record; the others return {}."""
        if self._start is None:
            return {}
        self._start = None
        mine = torch.tensor([step_time, input_wait, self._ready], dtype=torch.float64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        if self.rank != 0:
            return {}
        step_s, wait_s, ready_s = (list(col) for col in zip(*(t.tolist() for t in every)))
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "host": self.hosts, "step_time_s": step_s, "input_wait_s": wait_s,
                                "ready_s": ready_s}) + "\n")
        if not self.has_ready_point:
            return {}
        slowest = max(range(self.world), key=lambda r: ready_s[r])
        lag = ready_s[slowest] - statistics.median(ready_s[:slowest] + ready_s[slowest + 1:])  # behind the others
        return {"slowest_rank": slowest, "slowest_host": self.hosts[slowest], "slowest_lag_s": lag,
                "straggler": lag > self.threshold * statistics.median(step_s)}
