"""Checkpoints. Two kinds, both written atomically (a temporary name, renamed when every rank is done):

* training checkpoints: DeepSpeed's own sharded files (engine.save_checkpoint), for exact resume at the same layout;
* layout-free checkpoints: one safetensors file per canonical tensor (full, unsharded: weight, exp_avg, exp_avg_sq)
  plus manifest.json. They load at ANY tensor/pipeline/data layout (uneven token shards included), are what the
  resharding/expansion tool reads and writes, and are written next to every training checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import torch
import torch.distributed as dist

LATEST = "latest"
FORMAT = "tokenformer_mp.layout_free.v1"
MANIFEST = "manifest.json"
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
    with open(path) as f:
        return f.read().strip()


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify(path: str, manifest: dict | None = None) -> None:
    manifest = manifest or read_manifest(path)
    bad = [n for n, e in manifest["tensors"].items()
           if not os.path.exists(os.path.join(path, e["file"])) or sha256_file(os.path.join(path, e["file"])) != e["sha256"]]
    if bad:
        raise CheckpointError(f"{path}: missing or corrupt tensors (checksum mismatch): {', '.join(bad)}")


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
    from safetensors import safe_open

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
        e = manifest["tensors"][name]
        with safe_open(os.path.join(path, e["file"]), framework="pt") as f:
            rows = getattr(p, "shard_range", None)
            read = (lambda k: f.get_slice(k)[rows[0]:rows[1]]) if rows else (lambda k: f.get_tensor(k))
            weight = read("weight").to(p.device)
            with torch.no_grad():
                p.copy_(weight.to(p.dtype))  # the model's (low-precision) copy: used by the very next forward
            safe_set_full_fp32_param(p, weight)  # ZeRO's fp32 master
            if load_optimizer:
                for k in OPT_KEYS:
                    if k in e["keys"]:
                        safe_set_full_optimizer_state(p, read(k).to(p.device), k)
    return manifest


def load_weights(model: torch.nn.Module, path: str) -> dict:
    """Weights of a layout-free checkpoint into a plain, unsharded TokenFormer (evaluation, generation, tests)."""
    from safetensors import safe_open

    path = path if os.path.exists(os.path.join(path, MANIFEST)) else _resolve(path)
    manifest = read_manifest(path)
    state = {}
    for name, e in manifest["tensors"].items():
        with safe_open(os.path.join(path, e["file"]), framework="pt") as f:
            state[name] = f.get_tensor("weight")
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing)}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(state[name].shape):
                raise CheckpointError(f"{path}: {name}: checkpoint {list(state[name].shape)} vs model {list(p.shape)}")
            p.copy_(state[name])
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

def save_checkpoint(trainer, ckpt_dir: str, step: int, keep_last: int) -> None:
    tag = tag_for(step)
    trainer.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=trainer.client_state(), save_latest=False)
    save_layout_free(trainer, os.path.join(ckpt_dir, tag, "layout_free"))
    dist.barrier()  # every rank's files are complete before the pointer moves
    if dist.get_rank() == 0:
        write_atomic(os.path.join(ckpt_dir, LATEST), tag)
        tags = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("global_step") and d[11:].isdigit()),
                      key=lambda d: int(d[11:]))
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def load_checkpoint(trainer, ckpt_dir: str) -> dict:
    """A run directory's checkpoints/ (DeepSpeed files when the layout matches, else their layout-free copy), or
    a layout-free checkpoint directory (e.g. what the resharding tool wrote)."""
    if os.path.exists(os.path.join(ckpt_dir, MANIFEST)):
        manifest = load_layout_free(trainer, ckpt_dir)
        return {"step": manifest["step"], "manifest": manifest}
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: neither a '{LATEST}' file nor a {MANIFEST}: not a checkpoint")
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
