"""Activation memory per rank: the bytes autograd keeps for backward after one micro-batch's forward, by layout."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import Pattention
from ..parallel.local import run_ranks


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                           keep_gathered: bool = False) -> int:
    """Every tensor autograd saves during one forward, each storage once, parameters excluded. Sequence-parallel
    blocks keep slices of what they gather and report those to this counter; `keep_gathered` makes them keep the
    gathered inputs themselves (what they would without tensor_parallel.KeepGatheredAsSlices)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()  # kept alive until backward: no address is reused
        return t
    pack.observes_saved_tensors = not keep_gathered

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, labels)
    del loss
    return sum(saved.values())


def rank_activation_bytes(cfg: ModelConfig, tp: int, sequence_parallel: bool, micro_batch: int,
                          recompute: str = "none", keep_gathered: bool = False, compiled: bool = False) -> int:
    """This rank's saved activations for one micro-batch of random tokens (called on each of tp ranks).
    recompute: "none", "gelu" (Pattention's GELU recomputed) or "blocks" (activation checkpointing); compiled:
    the blocks compiled (train.compile), which then save what the compiled graph chooses."""
    import torch.distributed as dist

    from ..parallel import groups
    from ..parallel.build import apply_compile, build_model
    group = None
    if tp > 1:
        dist.init_process_group("gloo")
        groups.initialize(tp, 1)
        group = groups.tp_group()
    model = build_model(cfg, 0, group, sequence_parallel)
    model.activation_checkpointing = recompute == "blocks"  # a block keeps only its input (torch.utils.checkpoint's)
    for sub in model.modules():
        if isinstance(sub, Pattention):
            sub.recompute = recompute == "gelu"
    if compiled:
        apply_compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    n = saved_activation_bytes(model, tokens, tokens, keep_gathered)
    if tp > 1:
        dist.destroy_process_group()
    return n


def measure(cfg: ModelConfig, micro_batch: int, tps=(1, 2, 4)) -> list[dict]:
    """Rank 0's saved activations for each TP degree, with and without sequence parallelism, for each kind of
    recomputation (none, Pattention's GELU, whole blocks) and compiled blocks; and each as a fraction of TP=1's
    without any."""
    rows, base = [], None
    for recompute, compiled in (("none", False), ("gelu", False), ("blocks", False), ("none", True)):
        for tp in tps:
            for sp in ((False, True) if tp > 1 else (False,)):
                args = (cfg, tp, sp, micro_batch, recompute, False, compiled)
                n = run_ranks(tp, rank_activation_bytes, *args)[0] if tp > 1 else rank_activation_bytes(*args)
                base = base or n
                rows.append({"layout": f"tp{tp}{' sp' if sp else ''}", "recompute": recompute, "compiled": compiled,
                             "activation_mb": n / 2**20, "vs_tp1": n / base})
    return rows
