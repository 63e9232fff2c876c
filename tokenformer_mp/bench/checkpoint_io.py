"""Checkpoint I/O per rank: bytes written and read, seconds the training loop is blocked by a save (synchronous and
asynchronous), seconds to load, each against its ideal: the total over the world for writes, the rank's own share
for reads (the rows of each weight it holds and its ZeRO partition of the Adam moments)."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from ..config import load_config
from ..engine_checkpoint import Live, Saver, canonical_params, load_checkpoint, owned_segments
from ..parallel.local import run_ranks
from ..trainer import Trainer, shutdown
from .synthetic import FixedVocab, RandomTokens


def own_share(live: Live) -> int:
    """The bytes a rank must read to resume at its own layout: its rows of every weight (fp32), and its ZeRO
    fragment of each Adam moment."""
    weights = sum(p.numel() for _, p in canonical_params(live)) * 4
    moments = sum(t.numel() for _, key, _, t in owned_segments_all(live) if key != "weight") * 4
    return weights + moments


def owned_segments_all(live: Live):
    """This rank's ZeRO fragments of every parameter it holds, written by it or not (a tied or TP-replicated copy
    is read although another rank writes it)."""
    out = []
    for name, p in canonical_params(live):
        frag = getattr(p, "_hp_mapping", None)
        if frag is not None:
            out += [(name, key, 0, frag.get_hp_fragment(key)) for key in ("exp_avg", "exp_avg_sq")]
    return out


def _rank(config: str, overrides: dict, root: str) -> dict:
    cfg = load_config(config, {**overrides, "train.eval_interval": 0, "checkpoint.save_interval": 0,
                               "run_dir": os.path.join(root, "run")})
    vocab = cfg.model.vocab_size
    trainer = Trainer(cfg, datasets=(RandomTokens(64, cfg.model.seq_length, vocab), None), tokenizer=FixedVocab(vocab))
    trainer.train_step()  # Adam's state exists from the first step on
    trainer.step = 1
    out = {"rank": trainer.layout.rank}
    for mode, async_save in (("sync", False), ("async", True)):
        saver = Saver(trainer.live, os.path.join(root, mode), keep_last=1, async_save=async_save)
        torch.distributed.barrier()
        start = time.perf_counter()
        saver.save(trainer.step, trainer.run_record())
        out[f"{mode}_blocked_s"] = time.perf_counter() - start
        saver.finish()
        out[f"{mode}_total_s"] = time.perf_counter() - start
    shard = os.path.join(root, "sync", "global_step1", "shards", f"rank{trainer.layout.rank:05d}.safetensors")
    out["written_bytes"] = os.path.getsize(shard)
    out["elements_written"] = sum(t.numel() for *_, t in owned_segments(trainer.live))
    torch.distributed.barrier()
    start = time.perf_counter()
    loaded = load_checkpoint(trainer.live, os.path.join(root, "sync"))
    out["load_s"] = time.perf_counter() - start
    out["read_bytes"], out["read_ideal"] = loaded.bytes_read, own_share(trainer.live)
    out["params"] = sum(p.numel() for p in trainer.model.parameters())
    shutdown()
    return out


def measure(config: str, world: int, overrides: dict) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        ranks = run_ranks(world, _rank, config, overrides, root, timeout=1800)
    total = sum(r["written_bytes"] for r in ranks)
    ideal_write = total / world
    worst = lambda k, ideal: max(abs(r[k] - ideal(r)) / ideal(r) for r in ranks)  # noqa: E731
    return {
        "world": world, "layout": ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items() if "parallel" in k)
        or "dp", "checkpoint_gb": total / 1e9, "elements_written": sum(r["elements_written"] for r in ranks),
        "written_mb_per_rank": [round(r["written_bytes"] / 1e6, 1) for r in ranks],
        "write_vs_ideal": worst("written_bytes", lambda r: ideal_write),
        "read_mb_per_rank": [round(r["read_bytes"] / 1e6, 1) for r in ranks],
        "read_vs_ideal": worst("read_bytes", lambda r: r["read_ideal"]),
        "sync_blocked_s": max(r["sync_blocked_s"] for r in ranks),
        "async_blocked_s": max(r["async_blocked_s"] for r in ranks),
        "async_blocked_vs_sync": max(r["async_blocked_s"] for r in ranks) / max(r["sync_blocked_s"] for r in ranks),
        "async_total_s": max(r["async_total_s"] for r in ranks), "load_s": max(r["load_s"] for r in ranks),
        "within_targets": (worst("written_bytes", lambda r: ideal_write) <= 0.10
                           and worst("read_bytes", lambda r: r["read_ideal"]) <= 0.10
                           and max(r["async_blocked_s"] for r in ranks) <= 0.25 * max(r["sync_blocked_s"] for r in ranks)),
    }


LAYOUTS = ((1, {}), (2, {}), (4, {}), (4, {"parallel.tp": 2}))


def run(config: str = "configs/tokenformer-150m.yaml") -> list[dict]:
    """The benchmark: a small step of the config's model (sequence 128, one sequence per rank), saved both ways and
    loaded, at 1, 2 and 4 ranks (DP) and TP=2 x DP=2."""
    base = {"model.seq_length": 128, "train.micro_batch_size": 1, "train.global_batch_size": None,
            "train.grad_accum_steps": 1, "train.activation_checkpointing": False, "train.device": "cpu",
            "train.precision": "fp32"}
    return [measure(config, world, {**base, **layout}) for world, layout in LAYOUTS]

