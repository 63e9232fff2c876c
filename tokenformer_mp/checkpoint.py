"""Checkpoints: one layout-free format for training, resharding and inference (the tensor store: tokenformer_mp.store),
read and written without a live engine, and a run's checkpoints/ directory: which are complete, which to resume, which
to prune.

A training checkpoint, checkpoints/global_stepN/, is each rank's shard (shards/rankRRRRR.safetensors: its ZeRO
partition of its tensor-parallel shard of the fp32 weights and both Adam moments, each element written by one rank
only, and its RNG state) and manifest.json, written last once every rank's shard is complete: the completion record.
It loads at ANY tensor/pipeline/data layout. `latest` names the newest complete checkpoint; pruning keeps complete
ones only, by save order. A live engine saves and loads it through tokenformer_mp.engine_checkpoint.

The resharding tool and imports write the same format from full tensors in one process (OfflineWriter: one file per
tensor, one segment per tensor).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import torch

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


def check_fits(path: str, manifest: dict, shapes: dict[str, list[int]], model_cfg: ModelConfig) -> None:
    """Every tensor's full shape (canonical name -> shape, of what a model holds) and every function-changing config
    key against the checkpoint, before reading a byte."""
    problems = []
    for name, shape in shapes.items():
        e = manifest["tensors"].get(name)
        if e is None:
            problems.append(f"{name}: missing from the checkpoint")
        elif e["shape"] != list(shape):
            problems.append(f"{name}: checkpoint {e['shape']} vs model {list(shape)}")
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

