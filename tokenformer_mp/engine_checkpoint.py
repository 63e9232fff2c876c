"""A live DeepSpeed engine's checkpoints, in the layout-free format of tokenformer_mp.checkpoint: what each rank of a
training run saves (Saver: every rank its own shard, in parallel, optionally in the background) and loads
(load_checkpoint: at any layout, each rank the rows of each weight it holds and its own ZeRO partition of the Adam
moments, every block it reads checked). What training uses; offline readers (inference, convert, reshard, the
tools) need only the format, and none of DeepSpeed.

At its own layout the next steps equal the run that never stopped, bit for bit. With checkpoint.async_save the
training loop waits only while the state is copied to host memory: the shards are written in the background, and
the manifest and `latest` follow at a later step boundary once every rank has finished; a save waits for the one
before it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.utils import safe_set_full_fp32_param
from megatron.core import parallel_state as ps

from .checkpoint import (FORMAT, LATEST, MANIFEST, OPT_KEYS, CheckpointError, CheckpointMismatch, candidates,
                         check_fits, open_store, prune, scan, shard_file, tag_for)
from .checkpoint_dirs import is_run_checkpoints
from .config import ModelConfig
from .fileio import write_atomic
from .parallel.build import canonical_name
from .parallel.groups import Layout
from .store import StoreError, entry_name, segments_of, table, write_shard

log = logging.getLogger("tokenformer_mp")


@dataclass
class Live:
    """What a training checkpoint is taken from and loaded into: this rank's model (a PipelineModule at PP > 1), the
    DeepSpeed engine that trains it, where the rank sits, and the model's config."""
    model: torch.nn.Module
    engine: object  # deepspeed's DeepSpeedEngine, or its PipelineEngine at PP > 1
    layout: Layout
    model_cfg: ModelConfig


@dataclass
class Loaded:
    """What load_checkpoint read."""
    path: str  # the checkpoint directory (of a run's checkpoints/, the tag it resumed from)
    manifest: dict
    bytes_read: int  # by this rank


# --- a live engine's state: what each rank holds ----------------------------------------------------------------

def canonical_params(live: Live) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, local parameter) in module order, the same on every rank of a stage."""
    out = []
    for name, p in live.model.named_parameters():
        if live.layout.pp > 1:
            name = canonical_name(name, live.model_cfg.num_layers)
        out.append((name, p))
    return out


def full_shapes(live: Live) -> dict[str, list[int]]:
    """Canonical name -> the whole tensor's shape, of what this rank holds a part of."""
    return {name: list(getattr(p, "full_shape", None) or p.shape) for name, p in canonical_params(live)}


def _first_row(p) -> int:
    return p.shard_range[0] if getattr(p, "shard_range", None) is not None else 0


def _row_elems(p) -> int:
    shape = getattr(p, "full_shape", None) or tuple(p.shape)
    return math.prod(shape[1:])


def _writes(live: Live, name: str, p) -> bool:
    """Whether this rank writes its part of `name`: every element once. A tensor whole on every TP rank (the final
    norm) is written by TP rank 0; the tied embedding's copy on the last pipeline stage is not written at all."""
    if getattr(p, "shard_range", None) is None and ps.get_tensor_model_parallel_rank() != 0:
        return False
    return not (live.layout.pp > 1 and name.startswith("embed.") and ps.get_pipeline_model_parallel_rank() != 0)


def owned_segments(live: Live) -> list[tuple[str, str, int, torch.Tensor]]:
    """(name, key, start, values) of this rank's part of the state: for each parameter it writes, its ZeRO fragment
    of the fp32 weight and of each Adam moment (views of the optimizer's flat partitions), placed in the tensor's
    global flat index by the rows this TP rank holds."""
    out = []
    for name, p in canonical_params(live):
        frag = getattr(p, "_hp_mapping", None)
        if frag is None or not _writes(live, name, p):
            continue  # no part of it in this rank's ZeRO partition, or another rank writes it
        start = _first_row(p) * _row_elems(p) + frag.lp_fragment_address.start
        out.append((name, "weight", start, frag.get_hp_fragment()))
        out += [(name, key, start, frag.get_hp_fragment(key)) for key in OPT_KEYS]
    return out


def optimizer_step(live: Live) -> int:
    base = live.engine.optimizer.optimizer  # ZeRO wraps a torch AdamW over flat fp32 partitions
    steps = [int(s["step"]) for s in base.state.values() if "step" in s]
    return max(steps) if steps else 0


_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def engine_state(live: Live) -> dict:
    """DeepSpeed's counters and, in fp16, its dynamic loss scale: what an exact resume needs besides tensors."""
    e = live.engine
    out = {"global_steps": e.global_steps, "global_samples": e.global_samples, "skipped_steps": e.skipped_steps}
    scaler = getattr(e.optimizer, "loss_scaler", None)
    if scaler is not None:
        out["loss_scaler"] = {k: getattr(scaler, k) for k in _SCALER if hasattr(scaler, k)}
    return out


def restore_engine_state(live: Live, state: dict | None) -> None:
    if not state:
        return
    e = live.engine
    e.global_steps, e.global_samples, e.skipped_steps = (state["global_steps"], state["global_samples"],
                                                         state["skipped_steps"])
    scaler = getattr(e.optimizer, "loss_scaler", None)
    for k, v in (state.get("loss_scaler") or {}).items():
        if scaler is not None and hasattr(scaler, k):
            setattr(scaler, k, v)


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


# --- saving: every rank its own shard, in parallel, optionally in the background -------------------------------

def _host_copy(items: list[tuple[str, str, int, torch.Tensor]]) -> list[tuple[str, str, int, torch.Tensor]]:
    """A rank's state copied to fresh host buffers (fp32; about 12 bytes a parameter of its share: weights, Adam's
    two moments), pinned when the state is on a GPU, so the copy runs at full bandwidth and is all the training loop
    waits for under async_save. Held by the save's job only, so they go when the save is finalized."""
    out = []
    for name, key, start, t in items:
        buf = torch.empty(t.numel(), dtype=torch.float32, pin_memory=t.is_cuda)
        buf.copy_(t.detach().view(-1), non_blocking=t.is_cuda)
        out.append((name, key, start, buf))
    if any(t.is_cuda for *_, t in items):
        torch.cuda.synchronize()
    return out


class _ShardJob:
    """This rank's shard file written (now or on a background thread), with what the manifest needs of it."""

    def __init__(self, tag_dir: str, rank: int, items: list, rng: dict[str, torch.Tensor]):
        self.tag_dir, self.file, self.items, self.rng = tag_dir, shard_file(rank), items, rng
        self.result, self.error, self.seconds = None, None, 0.0
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        start = time.perf_counter()
        try:
            tensors = [(entry_name(n, k, s), t) for n, k, s, t in self.items]
            tensors += [(f"rng/{k}", v) for k, v in sorted(self.rng.items())]
            written = write_shard(os.path.join(self.tag_dir, self.file), tensors)
            rng = {k: {"start": 0, "length": v.numel(), "file": self.file, "entry": f"rng/{k}",
                       "blocks": written["blocks"][f"rng/{k}"]} for k, v in self.rng.items()}
            self.result = {"file": self.file, "info": {"size": written["size"], "header_sha256": written["header_sha256"]},
                           "segments": segments_of(self.file, written, self.items), "rng": rng}
        except Exception as e:  # reported to every rank when the save is finalized
            self.error = f"{os.path.join(self.tag_dir, self.file)}: {type(e).__name__}: {e}"
        self.seconds = time.perf_counter() - start

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


class Saver:
    """A run's training checkpoints. save() is collective; under async_save the shards are written in the background
    and finalize() (collective: the manifest, then `latest`, then pruning) runs at the first step boundary where
    every rank has finished (poll), before the next save, or at the end (finish)."""

    def __init__(self, live: Live, ckpt_dir: str, keep_last: int, async_save: bool):
        self.live, self.ckpt_dir, self.keep_last, self.async_save = live, ckpt_dir, keep_last, async_save
        self.pending: tuple[_ShardJob, dict] | None = None
        self.last = {}  # timings and bytes of the last finalized save, this rank (the checkpoint_io benchmark)

    def save(self, step: int, run: dict) -> None:
        """run: what the manifest records of the run besides the tensors (config, tokens_seen, grown_from,
        history: the trainer's run_record)."""
        self.finish()  # a save waits for the one before it
        t0 = time.perf_counter()
        tag_dir = os.path.join(self.ckpt_dir, tag_for(step))
        if dist.get_rank() == 0:
            if os.path.exists(tag_dir):
                log.warning("removing %s, left by an earlier save of this step, before saving it again", tag_dir)
                shutil.rmtree(tag_dir)
            os.makedirs(os.path.join(tag_dir, "shards"))
        dist.barrier()
        job = _ShardJob(tag_dir, dist.get_rank(), _host_copy(owned_segments(self.live)), _rng_state())
        meta = {**self._meta(step), "run": run}
        if self.async_save:
            job.start()
        else:
            job.run()
        self.pending = (job, meta)
        self.last = {"blocked_s": time.perf_counter() - t0}
        if not self.async_save:
            self.finalize()
            self.last["blocked_s"] = time.perf_counter() - t0

    def _meta(self, step: int) -> dict:
        return {"step": step, "tag": tag_for(step), "shapes": full_shapes(self.live),
                "optimizer_step": optimizer_step(self.live), "engine": engine_state(self.live)}

    def host_bytes(self) -> int:
        """Host memory this rank's save in flight holds (0 between saves)."""
        return 0 if self.pending is None else sum(t.numel() * t.element_size() for *_, t in self.pending[0].items)

    def local_done(self) -> bool:
        return self.pending is None or self.pending[0].done()

    def poll(self, all_done: bool) -> None:
        """At a step boundary, with all_done agreed by every rank: finalize a background save that has finished."""
        if self.pending is not None and all_done:
            self.finalize()

    def finish(self) -> None:
        """Wait for this rank's shard, then finalize (collective)."""
        if self.pending is not None:
            self.pending[0].join()
            self.finalize()

    def finalize(self) -> None:
        """Collective. Every rank's shard is complete: rank 0 writes the manifest (the completion record), then
        `latest`, then prunes. A rank whose shard failed fails the save on every rank; `latest` stays."""
        job, meta = self.pending
        self.pending = None
        pinned = any(t.is_pinned() for *_, t in job.items)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, {"error": job.error, "result": job.result, "shapes": meta["shapes"]})
        errors = [f"rank {r}: {p['error']}" for r, p in enumerate(parts) if p["error"]]
        tag_dir = job.tag_dir
        if errors:
            raise CheckpointError(f"{tag_dir}: not saved (the last complete checkpoint stays `latest`): "
                                  + "; ".join(errors))
        if dist.get_rank() == 0:
            run = meta["run"]
            shapes = {k: v for p in parts for k, v in p["shapes"].items()}
            segments = [s for p in parts for s in p["result"]["segments"]]
            seq = max([c[0] for c in scan(self.ckpt_dir)[0]], default=0) + 1
            manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seq": seq,
                        "config": run["config"], "model": run["config"]["model"],
                        "source_layout": self.live.layout.as_dict(),
                        "step": meta["step"], "tokens_seen": run["tokens_seen"],
                        "optimizer": {"step": meta["optimizer_step"]}, "engine": meta["engine"],
                        "grown_from": run["grown_from"], "growth": run["growth"], "history": run["history"],
                        **{k: run[k] for k in ("skipped_samples",) if k in run},
                        "files": {p["result"]["file"]: p["result"]["info"] for p in parts},
                        "rank_state": {str(r): p["result"]["rng"] for r, p in enumerate(parts)},
                        "tensors": table(shapes, segments)}
            write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(manifest))
            write_atomic(os.path.join(self.ckpt_dir, LATEST), meta["tag"])
            prune(self.ckpt_dir, self.keep_last)
        dist.barrier()
        self.last.update(written_bytes=sum(t.numel() * 4 for *_, t in job.items), write_s=job.seconds)
        del job
        if pinned:  # the caching host allocator would keep the freed pinned blocks for the life of the run
            torch.accelerator.empty_host_cache()


# --- loading into a live engine ----------------------------------------------------------------------------------

def adam_step_tensor(param: torch.Tensor, group: dict, step: int) -> torch.Tensor:
    """Adam's `step` where torch's own Optimizer.load_state_dict puts it: a float32 scalar on the parameter's device
    for fused or capturable groups (their kernels read it there: a CPU step makes fused AdamW on CUDA fail at its
    first step), on the CPU otherwise."""
    device = param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def _init_optimizer_state(live: Live, step: int) -> None:
    """ZeRO creates Adam's state lazily at the first step; create it now (zeros) so it can be overwritten."""
    zero = live.engine.optimizer
    base = zero.optimizer
    for group in base.param_groups:
        for p in group["params"]:
            st = base.state[p]
            st["step"] = adam_step_tensor(p, group, step)
            st.setdefault("exp_avg", torch.zeros_like(p))
            st.setdefault("exp_avg_sq", torch.zeros_like(p))
    zero._lazy_init_hp_params_optimizer_state()


def load_layout_free(live: Live, path: str, load_optimizer: bool = True) -> Loaded:
    """Load into the live engine at its own layout. Each rank reads the rows of each weight it holds and, of each
    Adam moment, its own ZeRO fragment; every block it reads is checked. Not collective."""
    manifest, store = open_store(path)
    check_fits(path, manifest, full_shapes(live), live.model_cfg)
    opt = manifest.get("optimizer")
    load_optimizer = load_optimizer and opt is not None
    if load_optimizer:
        _init_optimizer_state(live, opt["step"])
    try:
        for name, p in canonical_params(live):
            first = _first_row(p)
            weight = store.rows(name, "weight", first, first + p.shape[0]).to(p.device)
            with torch.no_grad():
                p.copy_(weight.to(p.dtype))  # the model's (low-precision) copy: used by the very next forward
            safe_set_full_fp32_param(p, weight)  # ZeRO's fp32 master: this rank's fragment of it
            frag = getattr(p, "_hp_mapping", None)
            if load_optimizer and frag is not None:
                start = first * _row_elems(p) + frag.lp_fragment_address.start
                n = frag.lp_fragment_address.numel
                for key in OPT_KEYS:
                    if key in manifest["tensors"][name]["keys"]:
                        frag.get_hp_fragment(key).copy_(store.read(name, key, start, start + n))
        same_layout = manifest["source_layout"] == live.layout.as_dict()
        rng = store.rank_state(dist.get_rank()) if same_layout else None
    except StoreError as e:
        raise CheckpointError(str(e)) from None
    if rng:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    if load_optimizer:
        restore_engine_state(live, manifest.get("engine"))
    return Loaded(path, manifest, store.bytes_read)


def _from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(live: Live, ckpt_dir: str) -> Loaded:
    """A layout-free checkpoint directory (what the resharding tool wrote, or one tag of a run), or a run's
    checkpoints/: the one `latest` names if it loads intact on every rank, else the newest complete one that does
    (logged, naming why). Collective: the ranks agree on success; none intact is a CheckpointError naming each
    problem."""
    if os.path.exists(os.path.join(ckpt_dir, MANIFEST)):
        return load_layout_free(live, ckpt_dir)
    if not is_run_checkpoints(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: neither a '{LATEST}' file, a checkpoint nor a {MANIFEST}: not a checkpoint")
    order, notes = _from_rank0(candidates(ckpt_dir) if dist.get_rank() == 0 else None)
    for tag in order:
        tag_dir = os.path.join(ckpt_dir, tag)
        try:
            loaded, problem = load_layout_free(live, tag_dir), None
        except CheckpointMismatch:
            raise
        except (CheckpointError, OSError) as e:
            loaded, problem = None, str(e)
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problems = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
        if not problems:
            if notes and dist.get_rank() == 0:
                log.warning("%s; resuming from the newest intact checkpoint, %s", "; ".join(notes), tag_dir)
            return loaded
        notes.append(f"{tag_dir}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    raise CheckpointError(f"{ckpt_dir}: no intact complete checkpoint to resume from"
                          + ("".join(f"\n  {n}" for n in notes) if notes else ""))
