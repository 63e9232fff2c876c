"""Training checkpoints through DeepSpeed's engine, made atomic: `latest` moves only after every rank finished."""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(trainer, ckpt_dir: str, step: int, keep_last: int) -> None:
    tag = tag_for(step)
    trainer.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=trainer.client_state(), save_latest=False)
    dist.barrier()  # every rank's files are complete before the pointer moves
    if dist.get_rank() == 0:
        _write_atomic(os.path.join(ckpt_dir, LATEST), tag)
        tags = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("global_step")), key=lambda d: int(d[11:]))
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def load_checkpoint(trainer, ckpt_dir: str) -> dict:
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no '{LATEST}' file, not a checkpoint directory")
    path, state = trainer.engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir}/{tag}: DeepSpeed could not load it")
    rng = state.get("rng") or {}
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    return state
