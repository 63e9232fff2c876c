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


# Without a GPU, ranks fork from one server process that imported the trainer's libraries once: megatron-core alone
# takes 5-7 s to import, which every spawned rank paid again (tests start a few hundred); a forked rank starts in
# 0.05 s. With a GPU they are spawned: a process that has asked CUDA anything, is_available() included, cannot give
# CUDA to a child forked from it ("Cannot re-initialize CUDA in forked subprocess"), and under a CUDA-built torch the
# imports themselves ask (megatron-core through torch.utils.cpp_extension, torch's inductor, DeepSpeed's accelerator
# detection: measured under torch 2.11+cu130). A child that never uses CUDA is unharmed by the asking, so a CPU host
# keeps the fast start whatever torch it has. tests/test_gpu_node.py starts ranks both ways.
PRELOAD = ["deepspeed", "megatron.core.parallel_state", "tokenformer_mp.trainer"]


def start_method(gpu: bool | None = None) -> tuple[str, list[str]]:
    """(how ranks start, what is imported before they do); gpu: whether they may use one (default: one is visible;
    asking here is harmless, the forkserver is a fresh process)."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    return ("spawn", []) if gpu else ("forkserver", PRELOAD)


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


def run_ranks(world: int, fn, *args, timeout: float = 300.0, gpu: bool | None = None) -> list:
    """fn(*args) on `world` ranks; what each returned. gpu: start them as where a GPU is visible (default: if one is)."""
    method, preload = start_method(gpu)
    ctx = mp.get_context(method)
    if preload:
        ctx.set_forkserver_preload(preload)
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
