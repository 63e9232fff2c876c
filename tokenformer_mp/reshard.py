"""Move a checkpoint to another parallel layout and grow its parameter tokens, in one streaming pass.

Checkpoints are layout-free (tensors as segments of their flat index, any rank's rows readable), so "resharding"
is: validate the target layout against the model, stamp it into the config, and copy tensor by tensor (read whole,
verified, written to a file of its own); the trainer reads each rank's rows at load time.
Expansion appends parameter tokens to every Pattention with zero keys (the function is unchanged: tau stays pinned
to the old token count) and N(0, std) values, so the new tokens can learn.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .checkpoint import MANIFEST, CheckpointError, OfflineWriter, check_target, read_manifest, resolve_source
from .config import PATTENTION_KINDS, Config, ConfigError, from_dict, validate
from .model import append_tokens, output_std, pattention_kind
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
    key_init: str = "zeros"
    value_init: str = "normal"
    allow_shrink: bool = False
    pin_tau: bool = True  # False: tau = sqrt(new n), the reference's growth (changes the function)


def plan_from_config(cfg_path: str) -> dict[str, int]:
    from .config import load_config
    m = load_config(cfg_path).model
    if m.arch != "tokenformer":
        raise CheckpointError(f"--expand-config {cfg_path}: model.arch {m.arch} has no parameter tokens to grow to")
    return {k: m.tokens(k) for k in PATTENTION_KINDS}


def reshard(src: str, dst: str, tp: int | None = None, pp: int | None = None, expand: ExpandPlan | None = None,
            optimizer: str = "keep", seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Returns the new manifest. optimizer: 'keep' (new tokens start with zero Adam state) or 'reset'."""
    if optimizer not in ("keep", "reset"):
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
    if expand is not None and old.arch != "tokenformer":
        raise CheckpointError(f"{src}: model.arch {old.arch}: growth appends parameter tokens to Pattention layers, "
                              f"which a {old.arch} has none of (its widths are fixed by its weights' shapes): "
                              f"only --tp/--pp apply to it")
    if expand is not None:
        for kind, n in expand.tokens.items():
            have = old.tokens(kind)
            if n < have and not expand.allow_shrink:
                raise CheckpointError(f"{kind}_tokens: {n} < {have} would drop trained tokens; "
                                      f"refused unless shrinking is asked for explicitly (--allow-shrink)")
            setattr(cfg.model, f"{kind}_tokens", n)
            # tau stays what the layer was built with: pin it before the count changes
            setattr(cfg.model, f"{kind}_scale_tokens", old.scale_tokens(kind) if expand.pin_tau else None)
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
    gen = torch.Generator().manual_seed(seed)
    value_std = output_std(cfg.model)  # as model.make_pattention
    keep_opt = optimizer == "keep" and manifest.get("optimizer") is not None
    try:
        for name, e in tqdm(manifest["tensors"].items(), desc="reshard", disable=None if progress else True,
                            unit="tensor"):  # None: a bar on a terminal only, not redraws in a log
            tensors = {k: store.full(name, k) for k in e["keys"] if k == "weight" or keep_opt}
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
        "history": manifest.get("history", []) + [{"from": src, "source_layout": manifest["source_layout"],
                                                   "target_layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp},
                                                   "expanded": grown, "optimizer": optimizer}]})
