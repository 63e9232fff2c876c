"""Checkpoints. Two kinds, both written atomically (a temporary name, renamed when every rank is done):

* training checkpoints: DeepSpeed's own sharded files (engine.save_checkpoint), for exact resume at the same layout,
  closed by a completion record (complete.json: sha256 and size of every file of the tag, and the save's sequence
  number) written once every rank's files are complete. Only complete checkpoints are resumed from or counted when
  pruning; a resume verifies every file of the one it picks and falls back to the newest intact one;
* layout-free checkpoints: one safetensors file per canonical tensor (full, unsharded: weight, exp_avg, exp_avg_sq)
  plus manifest.json. They load at ANY tensor/pipeline/data layout (uneven token shards included), are what the
  resharding/expansion tool reads and writes, and are written next to every training checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time

import torch
import torch.distributed as dist

log = logging.getLogger("tokenformer_mp")

LATEST = "latest"
COMPLETE = "complete.json"  # a training checkpoint's completion record, written last
FORMAT = "tokenformer_mp.layout_free.v1"
MANIFEST = "manifest.json"
TAG = re.compile(r"global_step(\d+)$")
OPT_KEYS = ("exp_avg", "exp_avg_sq")
# Config keys that change the function but not any tensor's shape: a mismatch would load silently otherwise.
FUNCTION_KEYS = ("norm", "num_heads", "rotary_pct", "rotary_base", "layernorm_eps", "qkv_scale_tokens",
                 "proj_scale_tokens", "ffn_scale_tokens")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"global_step{step}"


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read(4096).decode("utf-8", errors="replace").strip()  # garbage stays garbage, not a traceback


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str) -> str:
    return file_digest(path)["sha256"]


def file_digest(path: str) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


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


# --- canonical view of a live engine's parameters ----------------------------------------------------------------

def canonical_params(trainer) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, local parameter) in module order, the same on every rank of a stage."""
    from .parallel.build import canonical_name
    out = []
    for name, p in trainer.model.named_parameters():
        if trainer.layout.pp > 1:
            name = canonical_name(name, trainer.cfg.model.num_layers)
        out.append((name, p))
    return out


def _gather_rows(t: torch.Tensor, p, group) -> torch.Tensor:
    """Reassemble a row-sharded tensor (uneven shards allowed) from every tensor-parallel rank."""
    world = dist.get_world_size(group)
    rows = p.full_shape[0]
    from .parallel.tensor_parallel import shard_range
    sizes = [shard_range(rows, world, r) for r in range(world)]
    width = max(e - s for s, e in sizes)
    padded = torch.zeros((width,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: e - s] for part, (s, e) in zip(parts, sizes)])


def _local_rows(full: torch.Tensor, p) -> torch.Tensor:
    if getattr(p, "shard_range", None) is None:
        return full
    start, end = p.shard_range
    return full[start:end]


def save_layout_free(trainer, out_dir: str, with_optimizer: bool = True) -> None:
    """Collective over all ranks. Each tensor is written once, by the dp=0, tp=0 rank of its pipeline stage."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    tp_group = ps.get_tensor_model_parallel_group()
    writer = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    partial = out_dir.rstrip("/") + ".partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "tensors"))
    dist.barrier()
    entries = {}
    first_stage = ps.get_pipeline_model_parallel_rank() == 0
    for name, p in canonical_params(trainer):
        tensors = {"weight": safe_get_full_fp32_param(p)}
        if with_optimizer:
            tensors.update({k: safe_get_full_optimizer_state(p, k) for k in OPT_KEYS})
        tensors = {k: v for k, v in tensors.items() if v is not None}
        if getattr(p, "shard_range", None) is not None:
            tensors = {k: _gather_rows(v, p, tp_group) for k, v in tensors.items()}
        if not writer or (name.startswith("embed.") and not first_stage):  # the tied copy on the last stage
            continue
        path = os.path.join(partial, tensor_file(name))
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path)
        entries[name] = {"file": tensor_file(name), "shape": list(tensors["weight"].shape), "dtype": "float32",
                         "keys": sorted(tensors), "sha256": sha256_file(path)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entries)
    if dist.get_rank() == 0:
        tensors = {k: v for part in gathered for k, v in part.items()}
        manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "config": trainer.cfg.to_dict(), "model": trainer.cfg.to_dict()["model"],
                    "source_layout": {"tp": trainer.layout.tp, "pp": trainer.layout.pp, "dp": trainer.layout.dp},
                    "step": trainer.step, "tokens_seen": trainer.step * trainer.tokens_per_step,
                    "optimizer": {"step": optimizer_step(trainer)} if with_optimizer else None,
                    "grown_from": trainer.grown_from,
                    "tensors": dict(sorted(tensors.items()))}
        write_atomic(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(partial, out_dir)
    dist.barrier()


def optimizer_step(trainer) -> int:
    base = trainer.engine.optimizer.optimizer  # ZeRO wraps a torch AdamW over flat fp32 partitions
    steps = [int(s["step"]) for s in base.state.values() if "step" in s]
    return max(steps) if steps else 0


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path}: no {MANIFEST}; not a layout-free checkpoint")
    manifest = read_json(mpath, "the manifest")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{mpath}: no 'tensors' table")
    return manifest


def read_tensor_file(ckpt: str, name: str, entry: dict) -> dict[str, torch.Tensor]:
    """The tensors (weight, exp_avg, ...) of one canonical tensor's file, its sha256 checked against the manifest
    entry: the bytes are read once, hashed, and deserialised from memory. Every reader of layout-free checkpoints
    goes through here, so a flipped byte or a truncated file is an error naming the tensor, never a wrong model."""
    from safetensors.torch import load

    path = os.path.join(ckpt, entry["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: tensor {name}: cannot read it ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path}: tensor {name}: checksum mismatch against {MANIFEST} ({len(data)} bytes): "
                              f"the file is corrupt or truncated")
    return load(data)


def verify(path: str, manifest: dict | None = None) -> int:
    """Every tensor file against the manifest and, inside a training checkpoint, every file of the tag (DeepSpeed's
    included) against its completion record. Returns the number of files checked."""
    manifest = manifest or read_manifest(path)
    bad = [n for n, e in manifest["tensors"].items()
           if not os.path.exists(os.path.join(path, e["file"])) or sha256_file(os.path.join(path, e["file"])) != e["sha256"]]
    if bad:
        raise CheckpointError(f"{path}: missing or corrupt tensors (checksum mismatch): {', '.join(bad)}")
    tag_dir = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path.rstrip("/")) == "layout_free" and os.path.exists(os.path.join(tag_dir, COMPLETE)):
        record = read_complete(tag_dir)
        problems = check_files(tag_dir, record["files"], sorted(record["files"]))
        if problems:
            raise CheckpointError(f"{tag_dir}: " + "; ".join(problems))
        return len(manifest["tensors"]) + len(record["files"])
    return len(manifest["tensors"])


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


def load_layout_free(trainer, path: str, load_optimizer: bool = True) -> dict:
    """Load into the live engine at its own layout: each rank reads the rows of each tensor it holds."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    manifest = read_manifest(path)
    local = canonical_params(trainer)
    problems = []
    for name, p in local:
        e = manifest["tensors"].get(name)
        full_shape = list(getattr(p, "full_shape", None) or p.shape)
        if e is None:
            problems.append(f"{name}: missing from the checkpoint")
        elif e["shape"] != full_shape:
            problems.append(f"{name}: checkpoint {e['shape']} vs model {full_shape}")
    model_cfg = trainer.cfg.model
    for key in FUNCTION_KEYS:
        want = manifest["model"].get(key)
        if key.endswith("_scale_tokens"):  # None means "the token count": compare what tau really is
            kind = key[: -len("_scale_tokens")]
            want, have = want or manifest["model"][f"{kind}_tokens"], model_cfg.scale_tokens(kind)
        else:
            have = getattr(model_cfg, key)
        if want != have:
            problems.append(f"model.{key}: checkpoint {want} vs config {have}")
    if problems:
        raise CheckpointError(f"{path}: does not match the model:\n  " + "\n  ".join(problems))
    opt = manifest.get("optimizer")
    load_optimizer = load_optimizer and opt is not None
    if load_optimizer:
        _init_optimizer_state(trainer, opt["step"])
    for name, p in local:
        tensors = read_tensor_file(path, name, manifest["tensors"][name])
        weight = _local_rows(tensors["weight"], p).to(p.device)
        with torch.no_grad():
            p.copy_(weight.to(p.dtype))  # the model's (low-precision) copy: used by the very next forward
        safe_set_full_fp32_param(p, weight)  # ZeRO's fp32 master
        if load_optimizer:
            for k in OPT_KEYS:
                if k in tensors:
                    safe_set_full_optimizer_state(p, _local_rows(tensors[k], p).to(p.device), k)
    return manifest


def load_weights(model: torch.nn.Module, path: str) -> dict:
    """Weights of a layout-free checkpoint into a plain, unsharded TokenFormer (evaluation, generation, tests)."""
    path = path if os.path.exists(os.path.join(path, MANIFEST)) else _resolve(path)
    manifest = read_manifest(path)
    entries, params = manifest["tensors"], dict(model.named_parameters())
    missing = sorted(set(params) - set(entries))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing)}")
    for name, p in params.items():  # from the manifest, before reading a byte
        if list(p.shape) != list(entries[name]["shape"]):
            raise CheckpointError(f"{path}: {name}: checkpoint {entries[name]['shape']} vs model {list(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(read_tensor_file(path, name, entries[name])["weight"])
    return manifest


def write_layout_free(tensors: dict[str, torch.Tensor], cfg, out: str, note: dict | None = None) -> None:
    """Weights only (no optimizer state), from full tensors in one process: imports, tests, tools."""
    from safetensors.torch import save_file
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "tensors"))
    entries = {}
    for name, t in tensors.items():
        path = os.path.join(partial, tensor_file(name))
        save_file({"weight": t.detach().float().contiguous()}, path)
        entries[name] = {"file": tensor_file(name), "shape": list(t.shape), "dtype": "float32", "keys": ["weight"],
                         "sha256": sha256_file(path)}
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": cfg.to_dict(),
                "model": cfg.to_dict()["model"], "source_layout": {"tp": 1, "pp": 1, "dp": 1}, "step": 0,
                "tokens_seen": 0, "optimizer": None, "tensors": dict(sorted(entries.items())),
                "history": [note] if note else []}
    write_atomic(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(partial, out)


def _resolve(path: str) -> str:
    from .reshard import resolve_source
    return resolve_source(path)


def model_config_of(path: str):
    """The ModelConfig a layout-free checkpoint was written with."""
    from .config import ModelConfig, _build
    return _build(ModelConfig, read_manifest(_resolve(path))["model"])


# --- training checkpoints ----------------------------------------------------------------------------------------

def read_complete(tag_dir: str) -> dict:
    record = read_json(os.path.join(tag_dir, COMPLETE), "the completion record")
    if not isinstance(record.get("files"), dict) or not isinstance(record.get("seq"), int):
        raise CheckpointError(f"{os.path.join(tag_dir, COMPLETE)}: no 'files' table or 'seq' number")
    return record


def list_files(tag_dir: str) -> list[str]:
    """Every file under a tag directory (paths relative to it, sorted), its completion record aside."""
    out = []
    for root, _, names in os.walk(tag_dir):
        out += [os.path.relpath(os.path.join(root, n), tag_dir) for n in names]
    return sorted(n for n in out if n != COMPLETE)


def check_files(root: str, expected: dict[str, dict], names: list[str]) -> list[str]:
    """What is wrong with root/name for each of names (missing, size, sha256) against expected digests."""
    problems = []
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
            continue
        got = file_digest(path)
        if got["size"] != expected[name]["size"]:
            problems.append(f"{name}: {got['size']} bytes, the record says {expected[name]['size']} (truncated?)")
        elif got["sha256"] != expected[name]["sha256"]:
            problems.append(f"{name}: checksum mismatch (corrupt)")
    return problems


def _all_gather(obj) -> list:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def _from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def scan(ckpt_dir: str) -> tuple[list[tuple[int, str, dict]], list[str]]:
    """(complete checkpoints as (seq, tag, record), oldest save first; tag directories without a valid record)."""
    complete, partial = [], []
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    for tag in sorted(n for n in names if TAG.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))):
        try:
            record = read_complete(os.path.join(ckpt_dir, tag))
            complete.append((record["seq"], tag, record))
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
        notes.append(f"{latest_path} names {latest}, which has no valid completion record ({COMPLETE}: "
                     f"half-written, or written before completion records existed)")
    else:
        notes.append(f"{latest_path} names {latest}, which does not exist")
    return order, notes


def has_checkpoints(ckpt_dir: str) -> bool:
    """Whether a run has started saving here: a `latest` pointer or a complete checkpoint."""
    return os.path.exists(os.path.join(ckpt_dir, LATEST)) or bool(scan(ckpt_dir)[0])


def choose_checkpoint(ckpt_dir: str) -> str:
    """The checkpoint a resume loads, agreed by all ranks: the one `latest` names if it is complete and intact, else
    the newest intact complete one (logged, naming why). Every file of it is verified against its completion record
    once, the files split across ranks. None intact: CheckpointError naming the directory and each problem."""
    order, notes = _from_rank0(candidates(ckpt_dir) if dist.get_rank() == 0 else None)
    for tag in order:
        tag_dir = os.path.join(ckpt_dir, tag)
        try:
            record = read_complete(tag_dir)
            names = sorted(record["files"])
            mine = check_files(tag_dir, record["files"], names[dist.get_rank()::dist.get_world_size()])
        except (CheckpointError, OSError) as e:
            mine = [str(e)]
        problems = [p for part in _all_gather(mine) for p in part]
        if not problems:
            if notes and dist.get_rank() == 0:
                log.warning("%s; resuming from the newest intact checkpoint, %s", "; ".join(notes), tag_dir)
            return tag
        notes.append(f"{tag_dir}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    raise CheckpointError(f"{ckpt_dir}: no intact complete checkpoint to resume from"
                          + ("".join(f"\n  {n}" for n in notes) if notes else "")
                          + f"\n  (to start afresh from a layout-free copy: --checkpoint.load "
                            f"{ckpt_dir}/global_stepN/layout_free with a new --run-dir)")


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Remove half-written tag directories, and complete checkpoints beyond the newest keep_last by save order
    (0: keep all); never the one `latest` names, never the last complete one. One process (rank 0)."""
    complete, partial = scan(ckpt_dir)
    latest = read_latest(ckpt_dir)
    for tag in partial:
        if tag != latest:
            log.warning("removing %s: no completion record (a save that did not finish)", os.path.join(ckpt_dir, tag))
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    if keep_last > 0:
        for _, tag, _ in complete[:-keep_last]:
            if tag != latest:
                shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def save_checkpoint(trainer, ckpt_dir: str, step: int, keep_last: int) -> None:
    """Collective. DeepSpeed's files and the layout-free copy, then the completion record (every file hashed, the
    files split across ranks), then `latest`, then pruning."""
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if dist.get_rank() == 0 and os.path.exists(tag_dir):
        log.warning("removing %s, left by an earlier save of this step, before saving it again", tag_dir)
        shutil.rmtree(tag_dir)
    dist.barrier()
    trainer.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=trainer.client_state(), save_latest=False)
    save_layout_free(trainer, os.path.join(tag_dir, "layout_free"))
    dist.barrier()  # every rank's files are complete before they are hashed
    names = _from_rank0(list_files(tag_dir) if dist.get_rank() == 0 else None)
    mine = {n: file_digest(os.path.join(tag_dir, n)) for n in names[dist.get_rank()::dist.get_world_size()]}
    files = {k: v for part in _all_gather(mine) for k, v in part.items()}
    if dist.get_rank() == 0:
        seq = max([c[0] for c in scan(ckpt_dir)[0]], default=0) + 1
        record = {"tag": tag, "step": step, "seq": seq, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "files": dict(sorted(files.items()))}
        write_atomic(os.path.join(tag_dir, COMPLETE), json.dumps(record, indent=1))
        write_atomic(os.path.join(ckpt_dir, LATEST), tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()


def load_checkpoint(trainer, ckpt_dir: str) -> dict:
    """A run directory's checkpoints/ (its intact checkpoint, chosen by choose_checkpoint: DeepSpeed files when the
    layout matches, else their layout-free copy), or a layout-free checkpoint directory (e.g. what the resharding
    tool wrote). Collective."""
    if os.path.exists(os.path.join(ckpt_dir, MANIFEST)):
        manifest = load_layout_free(trainer, ckpt_dir)
        return {"step": manifest["step"], "manifest": manifest}
    if not os.path.isdir(ckpt_dir) or not (has_checkpoints(ckpt_dir) or scan(ckpt_dir)[1]):
        raise CheckpointError(f"{ckpt_dir}: neither a '{LATEST}' file, a checkpoint nor a {MANIFEST}: not a checkpoint")
    tag = choose_checkpoint(ckpt_dir)
    lf = os.path.join(ckpt_dir, tag, "layout_free")
    manifest = read_manifest(lf) if os.path.exists(lf) else None
    layout = {"tp": trainer.layout.tp, "pp": trainer.layout.pp, "dp": trainer.layout.dp}
    if manifest is not None and manifest["source_layout"] != layout:
        load_layout_free(trainer, lf)
        return {"step": manifest["step"], "manifest": manifest}
    path, state = trainer.engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}/{tag}: DeepSpeed could not load it")
    rng = state.get("rng") or {}
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    return {**state, "manifest": manifest}
