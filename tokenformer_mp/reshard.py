"""Move a checkpoint to another parallel layout and grow its parameter tokens, in one streaming pass.

Checkpoints are layout-free (full tensors, one file each), so "resharding" is: validate the target layout against
the model, stamp it into the config, and copy tensor by tensor; the trainer slices each rank's rows at load time.
Expansion appends parameter tokens to every Pattention with zero keys (the function is unchanged: tau stays pinned
to the old token count) and N(0, std) values, so the new tokens can learn.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .checkpoint import MANIFEST, CheckpointError, read_latest, read_manifest, sha256_file, write_atomic
from .config import PATTENTION_KINDS, Config, ConfigError, _build, validate
from .model import append_tokens

_PATTENTION = re.compile(r"layers\.\d+\.(?:attention\.(query|key|value|proj)|ffn)\.(key_tokens|value_tokens)$")


def pattention_kind(name: str) -> tuple[str, str] | None:
    """'layers.3.attention.key.value_tokens' -> ('qkv', 'value_tokens'); None for other tensors."""
    m = _PATTENTION.match(name)
    if m is None:
        return None
    sub, which = m.groups()
    return ("ffn" if sub is None else "proj" if sub == "proj" else "qkv"), which


def resolve_source(path: str) -> str:
    """A layout-free dir, a DeepSpeed tag dir holding one, or a run's checkpoints/ dir (its latest)."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        return path
    if os.path.exists(os.path.join(path, "layout_free", MANIFEST)):
        return os.path.join(path, "layout_free")
    tag = read_latest(path)
    if tag and os.path.exists(os.path.join(path, tag, "layout_free", MANIFEST)):
        return os.path.join(path, tag, "layout_free")
    raise CheckpointError(f"{path}: no checkpoint found (expected {MANIFEST}, layout_free/, or a 'latest' file)")


@dataclass
class ExpandPlan:
    tokens: dict[str, int]  # target token count per Pattention kind
    key_init: str = "zeros"
    value_init: str = "normal"
    allow_shrink: bool = False
    pin_tau: bool = True  # False: tau = sqrt(new n), the reference's growth (changes the function)


def plan_from_config(cfg_path: str) -> dict[str, int]:
    from .config import load_config
    m = load_config(cfg_path).model
    return {k: m.tokens(k) for k in PATTENTION_KINDS}


def reshard(src: str, dst: str, tp: int | None = None, pp: int | None = None, expand: ExpandPlan | None = None,
            optimizer: str = "keep", seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Returns the new manifest. optimizer: 'keep' (new tokens start with zero Adam state) or 'reset'."""
    if optimizer not in ("keep", "reset"):
        raise ValueError(f"optimizer={optimizer!r}: keep or reset")
    src = resolve_source(src)
    manifest = read_manifest(src)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    cfg: Config = _build(Config, manifest["config"])
    old = copy.deepcopy(cfg.model)
    if tp is not None:
        cfg.parallel.tp = tp
    if pp is not None:
        cfg.parallel.pp = pp
    if expand is not None:
        for kind, n in expand.tokens.items():
            have = old.tokens(kind)
            if n < have and not expand.allow_shrink:
                raise CheckpointError(f"{kind}_tokens: {n} < {have} would drop trained tokens; "
                                      f"refused unless shrinking is asked for explicitly (--allow-shrink)")
            setattr(cfg.model, f"{kind}_tokens", n)
            # tau stays what the layer was built with: pin it before the count changes
            setattr(cfg.model, f"{kind}_scale_tokens", old.scale_tokens(kind) if expand.pin_tau else None)
    try:
        validate(cfg, check_paths=False)
    except ConfigError as e:
        raise CheckpointError(f"target layout/model is invalid: {e}") from None

    from safetensors import safe_open
    from safetensors.torch import save_file

    partial = dst.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "tensors"))
    gen = torch.Generator().manual_seed(seed)
    value_std = 2.0 / cfg.model.num_layers / cfg.model.hidden_size**0.5  # as model.make_pattention
    keep_opt = optimizer == "keep" and manifest.get("optimizer") is not None
    entries = {}
    for name, e in tqdm(manifest["tensors"].items(), desc="reshard", disable=not progress, unit="tensor"):
        with safe_open(os.path.join(src, e["file"]), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k == "weight" or keep_opt}
        kind = pattention_kind(name)
        if kind is not None and expand is not None:
            n_old, n_new = old.tokens(kind[0]), cfg.model.tokens(kind[0])
            if n_new < n_old:
                tensors = {k: v[:n_new] for k, v in tensors.items()}
            elif n_new > n_old:
                init = expand.key_init if kind[1] == "key_tokens" else expand.value_init
                std = cfg.model.init_std if kind[1] == "key_tokens" else value_std
                tensors = {k: (append_tokens(v, n_new - n_old, init, std, gen) if k == "weight"
                               else append_tokens(v, n_new - n_old, "zeros", 0.0)) for k, v in tensors.items()}
        path = os.path.join(partial, e["file"])
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        entries[name] = {**e, "shape": list(tensors["weight"].shape), "keys": sorted(tensors),
                         "sha256": sha256_file(path)}
        del tensors
    grown = expand is not None and cfg.model != old
    new = {**manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": cfg.to_dict(),
           "model": cfg.to_dict()["model"], "tensors": entries,
           "optimizer": manifest.get("optimizer") if keep_opt else None,
           # a grown model starts a new LR schedule; a moved one continues where it stopped
           "step": 0 if grown else manifest["step"],
           # which tokens are "old" (train.old_tokens_lr_mult): the counts before this growth
           "grown_from": ({k: min(old.tokens(k), cfg.model.tokens(k)) for k in PATTENTION_KINDS} if grown
                          else manifest.get("grown_from")),
           "history": manifest.get("history", []) + [{"from": src, "source_layout": manifest["source_layout"],
                                                      "target_layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp},
                                                      "expanded": grown, "optimizer": optimizer}]}
    write_atomic(os.path.join(partial, MANIFEST), json.dumps(new, indent=1))
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(partial, dst)
    return new
