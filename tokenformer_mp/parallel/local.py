"""Run a function on N local ranks over gloo (127.0.0.1 only) and collect what each returns (tests, benchmarks)."""
from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks fork from one server process that imported the trainer's libraries once: megatron-core alone takes 5-7 s to
# import, which every spawned rank paid again (tests start a few hundred); a forked rank starts in 0.05 s.
# The preload must never ask CUDA anything: once a process has (torch.cuda.is_available() included), a child forked
# from it cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess"). DeepSpeed's import asks (its accelerator
# detection), so where torch is built with CUDA every rank imports DeepSpeed itself; a CPU-only torch has no CUDA to
# spoil, and DeepSpeed is preloaded there too (tests/test_launch.py checks the CUDA-free part with CUDA made to fail).
PRELOAD_CUDA_FREE = ["megatron.core.parallel_state", "tokenformer_mp.train"]


def preload_modules(cuda_built: bool | None = None) -> list[str]:
    """What the rank server imports before forking: DeepSpeed too only where torch has no CUDA."""
    cuda_built = torch.backends.cuda.is_built() if cuda_built is None else cuda_built
    return PRELOAD_CUDA_FREE + ([] if cuda_built else ["deepspeed"])


def _worker(rank, world, port, fn, args, queue, env):
    os.environ.clear()  # the caller's environment, as a spawned process would have it (not the server's)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        buf = io.BytesIO()  # plain bytes: tensors sent through a Queue would die with the child's shared memory
        torch.save(fn(*args), buf)
        queue.put((rank, buf.getvalue(), None))
    except BaseException:  # report, don't hang the parent
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(world: int, fn, *args, timeout: float = 300.0) -> list:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload_modules())
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, dict(os.environ))) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = [None] * world, []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world):
            while True:  # poll, so that a rank that died without reporting (killed, crashed at start-up) fails fast
                try:
                    rank, value, err = queue.get(timeout=1.0)
                    break
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        why = f"rank(s) {dead} exited with {[procs[r].exitcode for r in dead]}" if dead \
                            else f"no result within {timeout:.0f} s"
                        errors.append(f"{why} without reporting")
                        raise RuntimeError(errors[-1]) from None
            results[rank] = None if value is None else torch.load(io.BytesIO(value), weights_only=False)
            if err:
                errors.append(f"rank {rank}:\n{err}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results
