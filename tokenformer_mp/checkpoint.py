"""Checkpoints: one layout-free format for training, resharding and inference (the tensor store: tokenformer_mp.store).

A training checkpoint, checkpoints/global_stepN/, is each rank's shard (shards/rankRRRRR.safetensors: its ZeRO
partition of its tensor-parallel shard of the fp32 weights and both Adam moments, each element written by one rank
only, and its RNG state) and manifest.json, which rank 0 writes last, once every rank's shard is complete: the
completion record. It loads at ANY tensor/pipeline/data layout: each rank reads the rows of each weight it holds and
the optimizer state of its own ZeRO partition, checking every block it reads. At its own layout the next steps equal
the run that never stopped, bit for bit. `latest` names the newest complete checkpoint; pruning keeps complete ones
only, by save order. With checkpoint.async_save the training loop waits only while the state is copied to host
memory: the shards are written in the background, and the manifest and `latest` follow at a later step boundary
once every rank has finished; a save waits for the one before it.

The resharding tool and imports write the same format from full tensors in one process (OfflineWriter: one file per
tensor, one segment per tensor).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time

import torch
import torch.distributed as dist

from .checkpoint_dirs import LATEST, MANIFEST, TAG, is_run_checkpoints
from .config import ModelConfig, from_dict
from .fileio import write_atomic
from .store import Store, StoreError, entry_name, segments_of, table, write_shard

log = logging.getLogger("tokenformer_mp")

FORMAT = "tokenformer_mp.layout_free.v2"
OPT_KEYS = ("exp_avg", "exp_avg_sq")
# Config keys that change the function but not any tensor's shape: a mismatch would load silently otherwise.
FUNCTION_KEYS = ("arch", "norm", "num_heads", "rotary_pct", "rotary_base", "layernorm_eps", "qkv_scale_tokens",
                 "proj_scale_tokens", "ffn_scale_tokens")


class CheckpointError(RuntimeError):
    pass


class CheckpointMismatch(CheckpointError):
    """A checkpoint that is intact but does not fit the model (shapes, function keys): no other checkpoint of the
    same run would fit better, so a resume stops instead of falling back."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read(4096).decode("utf-8", errors="replace").strip()  # garbage stays garbage, not a traceback


def read_json(path: str, what: str) -> dict:
    """A JSON object the project wrote; a truncated or garbled one is a CheckpointError naming the file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON (truncated or corrupt): {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return obj


def tensor_file(name: str) -> str:
    return f"tensors/{name}.safetensors"


def shard_file(rank: int) -> str:
    return f"shards/rank{rank:05d}.safetensors"


# --- reading a layout-free checkpoint ----------------------------------------------------------------------------

def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path}: no {MANIFEST}; not a layout-free checkpoint")
    manifest = read_json(mpath, "the manifest")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{mpath}: no 'tensors' or 'files' table")
    return manifest


def open_store(path: str) -> tuple[dict, Store]:
    manifest = read_manifest(path)
    return manifest, Store(path, manifest)


def verify(path: str, manifest: dict | None = None) -> int:
    """Every block of every tensor and rank state against the manifest (inspect_checkpoint --verify). Returns the
    bytes checked."""
    store = Store(path, manifest or read_manifest(path))
    try:
        return store.verify()
    except StoreError as e:
        raise CheckpointError(str(e)) from None


def load_tensors(path: str, key: str = "weight") -> dict[str, torch.Tensor]:
    """Every tensor of a layout-free checkpoint, full and verified (tests, small tools)."""
    manifest, store = open_store(resolve_source(path))
    try:
        return {name: store.full(name, key) for name, e in manifest["tensors"].items() if key in e["keys"]}
    except StoreError as e:
        raise CheckpointError(str(e)) from None


def load_weights(model: torch.nn.Module, path: str) -> dict:
    """Weights of a layout-free checkpoint into a plain, unsharded TokenFormer (evaluation, generation, exports)."""
    path = resolve_source(path)
    manifest, store = open_store(path)
    entries, params = manifest["tensors"], dict(model.named_parameters())
    missing = sorted(set(params) - set(entries))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing)}")
    for name, p in params.items():  # from the manifest, before reading a byte
        if list(p.shape) != list(entries[name]["shape"]):
            raise CheckpointError(f"{path}: {name}: checkpoint {entries[name]['shape']} vs model {list(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            try:
                p.copy_(store.full(name))
            except StoreError as e:
                raise CheckpointError(str(e)) from None
    return manifest


def model_config_of(path: str):
    """The ModelConfig a layout-free checkpoint was written with."""
    return from_dict(ModelConfig, read_manifest(resolve_source(path))["model"])


# --- writing one from full tensors, in one process (imports, the resharding tool, tests) -------------------------

class OfflineWriter:
    """A layout-free checkpoint written one tensor at a time (memory flat in the model's size): each tensor's keys
    (weight, exp_avg, exp_avg_sq) in a file of its own, one segment each, under out.partial until commit()."""

    def __init__(self, out: str):
        self.out, self.partial = out, out.rstrip("/") + ".partial"
        shutil.rmtree(self.partial, ignore_errors=True)
        os.makedirs(os.path.join(self.partial, "tensors"))
        self.files, self.shapes, self.segments = {}, {}, []

    def add(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        file = tensor_file(name)
        items = [(name, key, 0, t.detach().float().cpu().contiguous().view(-1)) for key, t in sorted(tensors.items())]
        written = write_shard(os.path.join(self.partial, file), [(entry_name(n, k, s), t) for n, k, s, t in items])
        self.files[file] = {"size": written["size"], "header_sha256": written["header_sha256"]}
        self.shapes[name] = list(tensors["weight"].shape)
        self.segments += segments_of(file, written, items)

    def commit(self, **fields) -> dict:
        """Write the manifest (the given fields, the tensors and files tables) and move the checkpoint into place."""
        manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields,
                    "files": dict(sorted(self.files.items())), "tensors": table(self.shapes, self.segments)}
        write_atomic(os.path.join(self.partial, MANIFEST), json.dumps(manifest, indent=1))
        if os.path.exists(self.out):
            shutil.rmtree(self.out)
        os.replace(self.partial, self.out)
        return manifest

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def write_layout_free(tensors: dict[str, torch.Tensor], cfg, out: str, note: dict | None = None) -> None:
    """Weights only (no optimizer state), from full tensors in one process: imports, tests, tools."""
    writer = OfflineWriter(out)
    for name, t in tensors.items():
        writer.add(name, {"weight": t})
    writer.commit(config=cfg.to_dict(), model=cfg.to_dict()["model"], source_layout={"tp": 1, "pp": 1, "dp": 1},
                  step=0, tokens_seen=0, optimizer=None, history=[note] if note else [])


# --- a live engine's state: what each rank holds ----------------------------------------------------------------

def canonical_params(trainer) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, local parameter) in module order, the same on every rank of a stage."""
    # here: parallel.build imports DeepSpeed and megatron-core (3.8 s measured after torch); offline readers skip it
    from .parallel.build import canonical_name
    out = []
    for name, p in trainer.model.named_parameters():
        if trainer.layout.pp > 1:
            name = canonical_name(name, trainer.cfg.model.num_layers)
        out.append((name, p))
    return out


def _layout(trainer) -> dict[str, int]:
    lay = trainer.layout
    return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, **({"cp": lay.cp} if lay.cp > 1 else {})}


def _first_row(p) -> int:
    return p.shard_range[0] if getattr(p, "shard_range", None) is not None else 0


def _row_elems(p) -> int:
    shape = getattr(p, "full_shape", None) or tuple(p.shape)
    return math.prod(shape[1:])


def _writes(trainer, name: str, p) -> bool:
    """Whether this rank writes its part of `name`: every element once. A tensor whole on every TP rank (the final
    norm) is written by TP rank 0; the tied embedding's copy on the last pipeline stage is not written at all."""
    from megatron.core import parallel_state as ps
    if getattr(p, "shard_range", None) is None and ps.get_tensor_model_parallel_rank() != 0:
        return False
    return not (trainer.layout.pp > 1 and name.startswith("embed.") and ps.get_pipeline_model_parallel_rank() != 0)


def owned_segments(trainer) -> list[tuple[str, str, int, torch.Tensor]]:
    """(name, key, start, values) of this rank's part of the state: for each parameter it writes, its ZeRO fragment
    of the fp32 weight and of each Adam moment (views of the optimizer's flat partitions), placed in the tensor's
    global flat index by the rows this TP rank holds."""
    out = []
    for name, p in canonical_params(trainer):
        frag = getattr(p, "_hp_mapping", None)
        if frag is None or not _writes(trainer, name, p):
            continue  # no part of it in this rank's ZeRO partition, or another rank writes it
        start = _first_row(p) * _row_elems(p) + frag.lp_fragment_address.start
        out.append((name, "weight", start, frag.get_hp_fragment()))
        out += [(name, key, start, frag.get_hp_fragment(key)) for key in OPT_KEYS]
    return out


def optimizer_step(trainer) -> int:
    base = trainer.engine.optimizer.optimizer  # ZeRO wraps a torch AdamW over flat fp32 partitions
    steps = [int(s["step"]) for s in base.state.values() if "step" in s]
    return max(steps) if steps else 0


_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def engine_state(trainer) -> dict:
    """DeepSpeed's counters and, in fp16, its dynamic loss scale: what an exact resume needs besides tensors."""
    e = trainer.engine
    out = {"global_steps": e.global_steps, "global_samples": e.global_samples, "skipped_steps": e.skipped_steps}
    scaler = getattr(e.optimizer, "loss_scaler", None)
    if scaler is not None:
        out["loss_scaler"] = {k: getattr(scaler, k) for k in _SCALER if hasattr(scaler, k)}
    return out


def restore_engine_state(trainer, state: dict | None) -> None:
    if not state:
        return
    e = trainer.engine
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

    def __init__(self, trainer, ckpt_dir: str, keep_last: int, async_save: bool):
        self.trainer, self.ckpt_dir, self.keep_last, self.async_save = trainer, ckpt_dir, keep_last, async_save
        self.pending: tuple[_ShardJob, dict] | None = None
        self.last = {}  # timings and bytes of the last finalized save, this rank (the checkpoint_io benchmark)

    def save(self, step: int) -> None:
        self.finish()  # a save waits for the one before it
        t0 = time.perf_counter()
        tag_dir = os.path.join(self.ckpt_dir, tag_for(step))
        if dist.get_rank() == 0:
            if os.path.exists(tag_dir):
                log.warning("removing %s, left by an earlier save of this step, before saving it again", tag_dir)
                shutil.rmtree(tag_dir)
            os.makedirs(os.path.join(tag_dir, "shards"))
        dist.barrier()
        job = _ShardJob(tag_dir, dist.get_rank(), _host_copy(owned_segments(self.trainer)), _rng_state())
        meta = self._meta(step)
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
        tr = self.trainer
        shapes = {name: list(getattr(p, "full_shape", None) or p.shape) for name, p in canonical_params(tr)}
        return {"step": step, "tag": tag_for(step), "shapes": shapes, "optimizer_step": optimizer_step(tr),
                "engine": engine_state(tr)}

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
            tr = self.trainer
            shapes = {k: v for p in parts for k, v in p["shapes"].items()}
            segments = [s for p in parts for s in p["result"]["segments"]]
            seq = max([c[0] for c in scan(self.ckpt_dir)[0]], default=0) + 1
            manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seq": seq,
                        "config": tr.cfg.to_dict(), "model": tr.cfg.to_dict()["model"],
                        "source_layout": _layout(tr),
                        "step": meta["step"], "tokens_seen": meta["step"] * tr.tokens_per_step,
                        "optimizer": {"step": meta["optimizer_step"]}, "engine": meta["engine"],
                        "grown_from": tr.grown_from, "history": tr.lineage,
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


def _init_optimizer_state(trainer, step: int) -> None:
    """ZeRO creates Adam's state lazily at the first step; create it now (zeros) so it can be overwritten."""
    zero = trainer.engine.optimizer
    base = zero.optimizer
    for group in base.param_groups:
        for p in group["params"]:
            st = base.state[p]
            st["step"] = adam_step_tensor(p, group, step)
            st.setdefault("exp_avg", torch.zeros_like(p))
            st.setdefault("exp_avg_sq", torch.zeros_like(p))
    zero._lazy_init_hp_params_optimizer_state()


def check_fits(path: str, manifest: dict, trainer) -> None:
    """Every tensor's shape and every function-changing config key against the live model, before reading a byte."""
    problems = []
    for name, p in canonical_params(trainer):
        e = manifest["tensors"].get(name)
        full_shape = list(getattr(p, "full_shape", None) or p.shape)
        if e is None:
            problems.append(f"{name}: missing from the checkpoint")
        elif e["shape"] != full_shape:
            problems.append(f"{name}: checkpoint {e['shape']} vs model {full_shape}")
    model_cfg = trainer.cfg.model
    for key in FUNCTION_KEYS:
        want = manifest["model"].get(key, getattr(ModelConfig, key, None))  # a key newer than the checkpoint: its default
        if key.endswith("_scale_tokens"):  # None means "the token count": compare what tau really is
            kind = key[: -len("_scale_tokens")]
            want, have = want or manifest["model"][f"{kind}_tokens"], model_cfg.scale_tokens(kind)
        else:
            have = getattr(model_cfg, key)
        if want != have:
            problems.append(f"model.{key}: checkpoint {want} vs config {have}")
    if problems:
        raise CheckpointMismatch(f"{path}: does not match the model:\n  " + "\n  ".join(problems))


def load_layout_free(trainer, path: str, load_optimizer: bool = True) -> dict:
    """Load into the live engine at its own layout. Each rank reads the rows of each weight it holds and, of each
    Adam moment, its own ZeRO fragment; every block it reads is checked. Not collective."""
    from deepspeed.utils import safe_set_full_fp32_param

    manifest, store = open_store(path)
    check_fits(path, manifest, trainer)
    opt = manifest.get("optimizer")
    load_optimizer = load_optimizer and opt is not None
    if load_optimizer:
        _init_optimizer_state(trainer, opt["step"])
    try:
        for name, p in canonical_params(trainer):
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
        same_layout = manifest["source_layout"] == _layout(trainer)
        rng = store.rank_state(dist.get_rank()) if same_layout else None
    except StoreError as e:
        raise CheckpointError(str(e)) from None
    if rng:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    if load_optimizer:
        restore_engine_state(trainer, manifest.get("engine"))
    trainer.bytes_read = store.bytes_read
    return manifest


# --- a run's checkpoints: which are complete, which to resume, which to prune ----------------------------------

def scan(ckpt_dir: str) -> tuple[list[tuple[int, str, dict]], list[str]]:
    """(complete checkpoints as (seq, tag, manifest), oldest save first; tag directories without a valid manifest)."""
    complete, partial = [], []
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    for tag in sorted(n for n in names if TAG.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))):
        try:
            manifest = read_manifest(os.path.join(ckpt_dir, tag))
            complete.append((int(manifest.get("seq", 0)), tag, manifest))
        except (CheckpointError, OSError):
            partial.append(tag)
    return sorted(complete, key=lambda c: c[0]), partial


def candidates(ckpt_dir: str) -> tuple[list[str], list[str]]:
    """Complete checkpoints to resume from, best first (the one `latest` names, then newest saved first), and what
    is wrong with `latest` if anything (for the log)."""
    complete, partial = scan(ckpt_dir)
    order = [tag for _, tag, _ in reversed(complete)]
    latest_path = os.path.join(ckpt_dir, LATEST)
    try:
        latest = read_latest(ckpt_dir)
    except OSError as e:
        latest = f"<unreadable: {e.strerror}>"
    notes = []
    if latest is None:
        if order:
            notes.append(f"{latest_path} is missing")
    elif latest in order:
        order.remove(latest)
        order.insert(0, latest)
    elif not latest:
        notes.append(f"{latest_path} is empty")
    elif not TAG.match(latest):
        notes.append(f"{latest_path} holds {latest[:60]!r}, not a checkpoint tag")
    elif latest in partial:
        notes.append(f"{latest_path} names {latest}, which has no valid {MANIFEST} (a save that did not finish, "
                     f"or one written before format {FORMAT})")
    else:
        notes.append(f"{latest_path} names {latest}, which does not exist")
    return order, notes


def has_checkpoints(ckpt_dir: str) -> bool:
    """Whether a run has started saving here: a `latest` pointer or a complete checkpoint."""
    return os.path.exists(os.path.join(ckpt_dir, LATEST)) or bool(scan(ckpt_dir)[0])


def resolve_source(path: str, strict: bool = False) -> str:
    """A layout-free checkpoint directory (a run's tag directory is one), or a run's checkpoints/ directory: the
    complete checkpoint `latest` names, else the newest complete one (logged). strict (verifying what was asked
    for): a `latest` that is missing or names no complete checkpoint is an error, not a fallback."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        return path
    order, notes = candidates(path)
    if strict and notes:
        raise CheckpointError(f"{path}: " + "; ".join(notes) + (f" (the newest complete one is {order[0]}: verify "
                                                                 f"it by its directory)" if order else ""))
    for tag in order:  # complete checkpoints, `latest` first; the tensors are verified as they are read
        if notes:
            log.warning("%s; reading the newest complete checkpoint, %s", "; ".join(notes), tag)
        return os.path.join(path, tag)
    raise CheckpointError(f"{path}: no checkpoint found (expected {MANIFEST} or a run's checkpoints with a complete "
                          f"one)" + "".join(f"; {n}" for n in notes))


def check_target(src: str, dst: str) -> None:
    """Refuse to write where it would replace what is read or a run's own checkpoints, --overwrite or not."""
    s, d = os.path.realpath(src), os.path.realpath(dst)
    inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)  # noqa: E731
    if inside(d, s) or inside(s, d):
        raise CheckpointError(f"--save {dst}: {'is' if d == s else 'overlaps'} the source {src}; "
                              f"write the result to a new directory")
    node = d
    while True:
        if is_run_checkpoints(node):
            raise CheckpointError(f"--save {dst}: inside a run's checkpoint directory {node}; writing there would "
                                  f"replace that run's checkpoints: write to a directory of its own")
        parent = os.path.dirname(node)
        if parent == node:
            return
        node = parent


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Remove half-written tag directories, and complete checkpoints beyond the newest keep_last by save order
    (0: keep all); never the one `latest` names, never the last complete one. One process (rank 0)."""
    complete, partial = scan(ckpt_dir)
    latest = read_latest(ckpt_dir)
    for tag in partial:
        if tag != latest:
            log.warning("removing %s: no %s (a save that did not finish)", os.path.join(ckpt_dir, tag), MANIFEST)
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    if keep_last > 0:
        for _, tag, _ in complete[:-keep_last]:
            if tag != latest:
                shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def _from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(trainer, ckpt_dir: str) -> dict:
    """A layout-free checkpoint directory (what the resharding tool wrote, or one tag of a run), or a run's
    checkpoints/: the one `latest` names if it loads intact on every rank, else the newest complete one that does
    (logged, naming why). Collective: the ranks agree on success; none intact is a CheckpointError naming each
    problem."""
    if os.path.exists(os.path.join(ckpt_dir, MANIFEST)):
        return load_layout_free(trainer, ckpt_dir)
    if not is_run_checkpoints(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: neither a '{LATEST}' file, a checkpoint nor a {MANIFEST}: not a checkpoint")
    order, notes = _from_rank0(candidates(ckpt_dir) if dist.get_rank() == 0 else None)
    for tag in order:
        tag_dir = os.path.join(ckpt_dir, tag)
        try:
            manifest, problem = load_layout_free(trainer, tag_dir), None
        except CheckpointMismatch:
            raise
        except (CheckpointError, OSError) as e:
            manifest, problem = None, str(e)
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problems = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
        if not problems:
            if notes and dist.get_rank() == 0:
                log.warning("%s; resuming from the newest intact checkpoint, %s", "; ".join(notes), tag_dir)
            return manifest
        notes.append(f"{tag_dir}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    raise CheckpointError(f"{ckpt_dir}: no intact complete checkpoint to resume from"
                          + ("".join(f"\n  {n}" for n in notes) if notes else ""))
