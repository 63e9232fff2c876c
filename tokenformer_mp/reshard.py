"""Move a checkpoint to another parallel layout and grow its parameter tokens, in one streaming pass.

Checkpoints are layout-free (tensors as segments of their flat index, any rank's rows readable), so "resharding"
is: validate the target layout against the model, stamp it into the config, and copy tensor by tensor (read whole,
verified, written to a file of its own); the trainer reads each rank's rows at load time.
Expansion appends parameter tokens to every Pattention as a GrowthRecipe says (config.GROWTH_PRESETS): by default
zero keys (the function is unchanged: tau stays pinned to the old token count) and N(0, std) values, so the new
tokens can learn. The resolved recipe is recorded in the grown checkpoint (manifest `growth` and its history).
"""
from __future__ import annotations

import copy
import math
import os
import zlib
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .checkpoint import MANIFEST, CheckpointError, OfflineWriter, check_target, read_manifest, resolve_source
from .config import (PATTENTION_KINDS, Config, ConfigError, GrowthRecipe, check_growth, from_dict, load_config,
                     validate)
from .model import append_tokens, pattention_kind
from .store import Store, StoreError



def plan_from_factor(model: dict, factor: float, allow_shrink: bool = False) -> dict[str, int]:
    """--expand-factor F: every Pattention's token count times F, F a finite number above 1 (below 1 only with
    allow_shrink)."""
    if not math.isfinite(factor) or factor <= 0:
        raise CheckpointError(f"--expand-factor {factor}: must be a finite number above 1 (2 doubles every "
                              f"Pattention's tokens)")
    if factor == 1:
        raise CheckpointError("--expand-factor 1 grows nothing (it would only reset the step and record a growth): "
                              "to move the checkpoint to another layout, leave --expand-factor out and give --tp/--pp")
    if factor < 1 and not allow_shrink:
        raise CheckpointError(f"--expand-factor {factor} < 1 shrinks every Pattention, dropping trained tokens: "
                              f"refused unless shrinking is asked for explicitly (--allow-shrink); "
                              f"did you mean {1 / factor:g}?")
    return {k: int(round(model[f"{k}_tokens"] * factor)) for k in PATTENTION_KINDS}


@dataclass
class ExpandPlan:
    tokens: dict[str, int]  # target token count per Pattention kind
    recipe: GrowthRecipe = field(default_factory=GrowthRecipe)  # default: preserve (the function is kept)
    allow_shrink: bool = False


def add_noise(t: torch.Tensor, std: float, relative: bool, seed: int, name: str) -> torch.Tensor:
    """t + N(0, s), s = std x t's own std (relative) or std; drawn from a generator of this tensor's own, seeded
    by (seed, name): the same noise whatever order the tensors are visited in."""
    if std == 0:
        return t
    scale = std * t.float().std().item() if relative else std
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return (t.float() + torch.randn(t.shape, generator=g).mul_(scale)).to(t.dtype)


def plan_from_config(cfg_path: str) -> dict[str, int]:
    m = load_config(cfg_path).model
    if m.arch != "tokenformer":
        raise CheckpointError(f"--expand-config {cfg_path}: model.arch {m.arch} has no parameter tokens to grow to")
    return {k: m.tokens(k) for k in PATTENTION_KINDS}


def reshard(src: str, dst: str, tp: int | None = None, pp: int | None = None, expand: ExpandPlan | None = None,
            optimizer: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Returns the new manifest. optimizer: 'keep' (new tokens start with zero Adam state) or 'reset'; None: the
    growth recipe's, or keep."""
    if expand is not None:
        try:
            check_growth(expand.recipe)
        except ConfigError as e:
            raise CheckpointError(f"growth recipe: {e}") from None
        if optimizer is not None and expand.recipe.optimizer not in (None, optimizer):
            raise ValueError(f"optimizer={optimizer!r} but the growth recipe says {expand.recipe.optimizer!r}")
    if optimizer not in (None, "keep", "reset"):
        raise ValueError(f"optimizer={optimizer!r}: keep or reset")
    src = resolve_source(src)
    manifest = read_manifest(src)
    check_target(src, dst)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.exists(dst) and not os.path.exists(os.path.join(dst, MANIFEST)):
        raise CheckpointError(f"{dst} exists and is not a layout-free checkpoint (no {MANIFEST}): --overwrite "
                              f"replaces only one of those")
    cfg: Config = from_dict(Config, manifest["config"])
    old = copy.deepcopy(cfg.model)
    if tp is not None:
        cfg.parallel.tp = tp
    if pp is not None:
        cfg.parallel.pp = pp
    recipe = None
    if expand is not None and old.arch != "tokenformer":
        raise CheckpointError(f"{src}: model.arch {old.arch}: growth appends parameter tokens to Pattention layers, "
                              f"which a {old.arch} has none of (its widths are fixed by its weights' shapes): "
                              f"only --tp/--pp apply to it")
    if expand is not None:
        recipe = expand.recipe.resolved(cfg.model)
        recipe["optimizer"] = optimizer = optimizer or recipe["optimizer"]
        for kind, n in expand.tokens.items():
            have = old.tokens(kind)
            if n < have and not expand.allow_shrink:
                raise CheckpointError(f"{kind}_tokens: {n} < {have} would drop trained tokens; "
                                      f"refused unless shrinking is asked for explicitly (--allow-shrink)")
            setattr(cfg.model, f"{kind}_tokens", n)
            # pinned: tau stays what the layer was built with, held before the count changes
            setattr(cfg.model, f"{kind}_scale_tokens", old.scale_tokens(kind) if recipe["tau"] == "pinned"
                    else None)
        if all(cfg.model.tokens(k) == old.tokens(k) for k in PATTENTION_KINDS):
            have = ", ".join(f"{k}={old.tokens(k)}" for k in PATTENTION_KINDS)
            raise CheckpointError(f"expansion to the token counts the checkpoint has ({have}) grows nothing: to move "
                                  f"it to another layout, give only --tp/--pp")
    try:
        validate(cfg, check_paths=False)
    except ConfigError as e:
        raise CheckpointError(f"target layout/model is invalid: {e}") from None

    store = Store(src, manifest)
    writer = OfflineWriter(dst)
    # one generator for every new token, in the manifest's tensor order (the growth this tool has always written)
    gen = torch.Generator().manual_seed(recipe["seed"] if recipe else 0)
    keep_opt = optimizer != "reset" and manifest.get("optimizer") is not None
    try:
        for name, e in tqdm(manifest["tensors"].items(), desc="reshard", disable=None if progress else True,
                            unit="tensor"):  # None: a bar on a terminal only, not redraws in a log
            tensors = {k: store.full(name, k) for k in e["keys"] if k == "weight" or keep_opt}
            kind = pattention_kind(name)
            if kind is not None and expand is not None:
                n_old, n_new = old.tokens(kind[0]), cfg.model.tokens(kind[0])
                tensors["weight"] = add_noise(tensors["weight"], recipe["noise_std"], recipe["noise"] == "relative",
                                              recipe["seed"], name)
                if n_new < n_old:
                    tensors = {k: v[:n_new] for k, v in tensors.items()}
                elif n_new > n_old:
                    part = "key" if kind[1] == "key_tokens" else "value"
                    init, std = recipe[f"{part}_init"], recipe[f"{part}_std"]
                    tensors = {k: (append_tokens(v, n_new - n_old, init, std, gen) if k == "weight"
                                   else append_tokens(v, n_new - n_old, "zeros", 0.0)) for k, v in tensors.items()}
            writer.add(name, tensors)
            del tensors
    except BaseException as e:  # a corrupt source tensor, a full disk: leave nothing half-written
        writer.discard()
        if isinstance(e, StoreError):
            raise CheckpointError(str(e)) from None
        raise
    grown = expand is not None and cfg.model != old
    kept = {k: v for k, v in manifest.items() if k not in ("format", "created", "files", "tensors", "rank_state", "seq")}
    return writer.commit(**{
        **kept, "config": cfg.to_dict(), "model": cfg.to_dict()["model"],
        "optimizer": manifest.get("optimizer") if keep_opt else None,
        "engine": manifest.get("engine") if keep_opt and not grown else None,
        # a grown model starts a new LR schedule; a moved one continues where it stopped
        "step": 0 if grown else manifest["step"],
        # which tokens are "old" (train.old_tokens_lr_mult): the counts before this growth
        "grown_from": ({k: min(old.tokens(k), cfg.model.tokens(k)) for k in PATTENTION_KINDS} if grown
                       else manifest.get("grown_from")),
        # how it grew and how its new stage trains (the trainer runs this schedule); a move keeps the last one
        "growth": recipe if grown else manifest.get("growth"),
        "history": manifest.get("history", []) + [{"from": src, "source_layout": manifest["source_layout"],
                                                   "target_layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp},
                                                   "expanded": grown, "optimizer": optimizer or "keep",
                                                   **({"recipe": recipe} if grown else {})}]})
