"""The hang watchdog: a step that does not finish in time ends the job with every rank's stacks and the ranks that
held it up named, instead of a collective timeout minutes later that names nobody.

Every rank arms it for each step (the step and the step boundary, not validation or saving). When it fires, the
rank writes all of its threads' Python stacks to RUN/hang/rankN.txt (on a GPU also NCCL's Flight Recorder, where
PyTorch records one), and where its main thread is: inside a collective (waiting for the others) or outside any
(holding them up). The ranks meet in the process group's key-value store, which answers while the collectives hang;
the first to see every report (or, after a grace period, those that came) prints one line naming the ranks outside
any collective, or the ones that never reported, and writes RUN/hang/summary.txt. Every rank then exits HANG_EXIT.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from .fileio import write_atomic

log = logging.getLogger(__name__)

HANG_EXIT = 4
REPORT_GRACE_S = 15.0  # how long the first rank to fire waits for the others' reports
WARMUP_STEPS = 5  # steps timed before the timeout follows the step time (the first steps compile and warm up)
STEP_TIME_FACTOR = 10.0  # after warm-up: this many times the slowest step seen ...
MIN_TIMEOUT_S = 60.0  # ... but never less (a save, a slow input read, a loaded node)
FIRST_STEP_FACTOR = 4.0  # a process's first step: torch.compile of a large model alone can take minutes
_COLLECTIVE_FILES = (os.sep.join(("torch", "distributed", "")), os.sep.join(("deepspeed", "comm", "")))


def where(frame) -> str:
    """Where a thread is: 'in a collective: NAME (file:line) from CALLER (file:line)' if any frame is
    torch.distributed's or DeepSpeed's communication, else 'outside any collective: FUNC (file:line)' at the
    innermost frame."""
    innermost, collective = frame, None
    while frame is not None:
        code = frame.f_code
        ours = any(part in code.co_filename for part in _COLLECTIVE_FILES)
        if ours and collective is None:
            collective = f"{code.co_name} ({_short(code.co_filename)}:{frame.f_lineno})"
        elif collective is not None and not ours:  # who called it: the collective's purpose
            return f"in a collective: {collective} from {code.co_name} ({_short(code.co_filename)}:{frame.f_lineno})"
        frame = frame.f_back
    if collective is not None:
        return f"in a collective: {collective}"
    code = innermost.f_code
    return f"outside any collective: {code.co_name} ({_short(code.co_filename)}:{innermost.f_lineno})"


def _short(path: str) -> str:
    parts = path.split(os.sep)
    return os.sep.join(parts[-3:])


def timeout_for(configured: float, step_times: list[float]) -> float:
    """FIRST_STEP_FACTOR times the configured timeout before any step is timed (compilation, communicators and
    allocators set up in the first step of a process); the configured one until WARMUP_STEPS steps are timed; then
    STEP_TIME_FACTOR times the slowest of them (at least MIN_TIMEOUT_S), never more than configured."""
    if not step_times:
        return FIRST_STEP_FACTOR * configured
    if len(step_times) < WARMUP_STEPS:
        return configured
    return min(configured, max(MIN_TIMEOUT_S, STEP_TIME_FACTOR * max(step_times)))


class HangWatchdog:
    def __init__(self, run_dir: str, rank: int, world: int, timeout_s: float, exit=os._exit):
        self.dir, self.rank, self.world, self.configured = os.path.join(run_dir, "hang"), rank, world, timeout_s
        self.step_times: list[float] = []
        self._deadline, self._step, self._armed_at, self.forwards = None, 0, 0.0, 0
        self._main = threading.main_thread()
        self._exit = exit
        self._stop = threading.Event()
        self.fired = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    def forward_started(self, *_) -> None:
        """A forward pass began (a forward pre-hook on the model): how far into the step this rank got."""
        self.forwards += 1

    def arm(self, step: int) -> None:
        if step != self._step:
            self.forwards = 0  # counted per step: the step and its boundary share one count
        self._step, self._armed_at = step, time.monotonic()
        self._deadline = self._armed_at + timeout_for(self.configured, self.step_times)

    def disarm(self, finished: bool = False) -> None:
        """finished: the step is done; its armed time counts towards the timeout that follows the step time."""
        if finished and self._deadline is not None:
            self.step_times = (self.step_times + [time.monotonic() - self._armed_at])[-20:]
        self._deadline = None

    def close(self) -> None:
        """Stop watching. Once fired, the report decides how the process ends (HANG_EXIT): the main thread, here after
        whatever a broken collective raised in it (another rank exits first), waits for it instead of exiting 1."""
        self._stop.set()
        self._deadline = None
        if self.fired.is_set():
            self._thread.join()  # the report ends with os._exit; a test's exit hook returns

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._fire(self._step, time.monotonic() - self._armed_at)
                return

    def _fire(self, step: int, waited: float) -> None:
        self.fired.set()
        try:
            self._report(step, waited)
        finally:  # whatever went wrong in the report, the job must not stay hung
            self._exit(HANG_EXIT)

    def _report(self, step: int, waited: float) -> None:
        os.makedirs(self.dir, exist_ok=True)
        frame = sys._current_frames().get(self._main.ident)
        here = where(frame) if frame is not None else "outside any collective: (no main thread)"
        report = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": step,
                  "waited_s": round(waited, 1), "forwards": self.forwards, "where": here}
        with open(os.path.join(self.dir, f"rank{self.rank}.txt"), "w") as f:
            f.write(f"rank {self.rank} on {report['host']} (pid {report['pid']}): step {step} not finished after "
                    f"{waited:.0f} s; {here}\n\nPython stacks of every thread:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        _dump_flight_recorder(os.path.join(self.dir, f"rank{self.rank}.nccl_trace.pkl"))
        line = self._meet(report)
        if line is not None:
            print(f"error: {line}", file=sys.stderr, flush=True)

    def _meet(self, report: dict) -> str | None:
        """Post this rank's report; the first rank that sees all of them (or the grace period end) gets the summary
        line to print and writes summary.txt; None for the others."""
        store = _store()
        if store is None or self.world == 1:
            return summary([report], 1, self.dir)
        keys = [f"tokenformer/hang/{r}" for r in range(self.world)]
        try:
            store.set(keys[self.rank], json.dumps(report))
            end = time.monotonic() + REPORT_GRACE_S
            while time.monotonic() < end and not store.check(keys):
                time.sleep(0.2)
            reports = [json.loads(store.get(k)) for k in keys if store.check([k])]
            first = store.add("tokenformer/hang/summarised", 1) == 1
            store.add("tokenformer/hang/read", 1)
            if self.rank == 0:  # the store lives in rank 0's process: let the others finish reading it
                end = time.monotonic() + 5
                while time.monotonic() < end and store.add("tokenformer/hang/read", 0) < len(reports):
                    time.sleep(0.1)
        except Exception as e:  # noqa: BLE001 (the store went with a rank that exited first: this one's file stays)
            log.warning("hang report of rank %d not shared: %s", self.rank, e)
            return None
        return summary(reports, self.world, self.dir) if first else None


def summary(reports: list[dict], world: int, out_dir: str) -> str:
    """The line that names who held the step up, also written to out_dir/summary.txt with every report.

    The ranks behind are those with the fewest forward passes into the step, where the counts differ: the others
    ran ahead into a collective that waits for them. That holds on NCCL too, where a collective returns at once and
    a waiting rank's stack shows its next synchronisation instead. With equal counts, the ranks outside any
    collective are named."""
    step = max(r["step"] for r in reports)
    silent = sorted(set(range(world)) - {r["rank"] for r in reports})
    fewest = min(r["forwards"] for r in reports)
    behind = [r for r in reports if r["forwards"] == fewest] \
        if any(r["forwards"] != fewest for r in reports) else [r for r in reports if r["where"].startswith("outside")]
    if behind or silent:
        named = ", ".join([f"rank {r['rank']} on {r['host']} ({r['forwards']} forward pass"
                           f"{'' if r['forwards'] == 1 else 'es'} into the step; {r['where']})" for r in behind]
                          + [f"rank {r} (no report: dead or stuck without Python)" for r in silent])
        line = f"hang at step {step}: held up by {named}; the others wait for it"
    else:
        line = f"hang at step {step}: every rank waits in a collective (a mismatch or a lost peer): " + \
               "; ".join(f"rank {r['rank']} {r['where']}" for r in sorted(reports, key=lambda r: r["rank"]))
    line += f". Stacks in {out_dir}"
    write_atomic(os.path.join(out_dir, "summary.txt"),
                 line + "\n" + "".join(json.dumps(r) + "\n" for r in sorted(reports, key=lambda r: r["rank"])))
    return line


def _store():
    """The default process group's store (answers while a collective hangs); None without a process group."""
    if not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


def _dump_flight_recorder(path: str) -> None:
    """NCCL's Flight Recorder (the last collectives each communicator ran), where PyTorch records one
    (TORCH_NCCL_TRACE_BUFFER_SIZE > 0, a GPU run); nothing otherwise."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None or not torch.cuda.is_available():
        return
    try:
        data = dump()
    except Exception as e:  # noqa: BLE001 (a hang report must not fail on its optional part)
        log.warning("no NCCL flight recorder dump: %s", e)
        return
    if data:
        with open(path, "wb") as f:
            f.write(data)
