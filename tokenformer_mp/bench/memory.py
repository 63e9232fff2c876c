"""Activation memory per rank: the bytes autograd keeps for backward after one micro-batch's forward, by layout."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..model import Pattention, count_params
from ..parallel import groups
from ..parallel.build import apply_compile, build_model
from ..parallel.context_parallel import chunk_index
from ..parallel.local import run_ranks


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                           keep_gathered: bool = False, position_ids: torch.Tensor | None = None) -> int:
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
        loss = model(tokens, labels, position_ids=position_ids)
    del loss
    return sum(saved.values())


def rank_activation_bytes(cfg: ModelConfig, tp: int, sequence_parallel: bool, micro_batch: int,
                          recompute: str = "none", keep_gathered: bool = False, compiled: bool = False, cp: int = 1,
                          dtype: torch.dtype = torch.float32) -> int:
    """This rank's saved activations for one micro-batch of random tokens (called on each of tp x cp ranks).
    recompute: "none", "gelu" (Pattention's GELU recomputed) or "blocks" (activation checkpointing); compiled:
    the blocks compiled (train.compile), which then save what the compiled graph chooses; cp: the sequence split
    over cp ranks (this rank's chunks of it); dtype: the weights' and activations' (bf16 as on a GPU)."""
    group = cp_group = None
    if tp * cp > 1:
        dist.init_process_group("gloo")
        groups.initialize(tp, 1, cp=cp)
        group = groups.tp_group() if tp > 1 else None
        cp_group = groups.cp_group() if cp > 1 else None
    model = build_model(cfg, 0, group, sequence_parallel, cp_group).to(dtype)
    model.activation_checkpointing = recompute == "blocks"  # a block keeps only its input (torch.utils.checkpoint's)
    for sub in model.modules():
        if isinstance(sub, Pattention):
            sub.recompute = recompute == "gelu"
    if compiled:
        apply_compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    positions = None
    if cp > 1:  # this rank's chunks, at their places in the sequence
        index = chunk_index(cfg.seq_length, cp, groups.ps.get_context_parallel_rank())
        tokens, positions = tokens[:, index], index.expand(micro_batch, -1)
    n = saved_activation_bytes(model, tokens, tokens, keep_gathered, positions)
    if tp * cp > 1:
        dist.destroy_process_group()
        groups.ps.destroy_model_parallel()
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


def predicted_saved_bytes(cfg: ModelConfig, per_token: float, cp: int, recompute: str, micro_batch: int = 1,
                          tp: int = 1, act_bytes: int = 4, cpu_rank: int | None = None) -> int:
    """A CP rank's saved activations from `per_token`, measured at CP=1 (rank_activation_bytes / tokens): what
    scales with this rank's T / CP tokens, plus what context parallelism adds in each layer (nothing with activation
    checkpointing, where a block keeps only its input), without documents:
      the all-gathered K and V, [2, T, h / TP], beside this rank's own [2, T / CP, h / TP] counted at CP=1
      the attention output twice, [T / CP, h / TP]: its two chunks kept by SDPA, and concatenated by the projection
      on a CPU (`cpu_rank`: this rank's), the causal masks of its chunks that torch materialises there, [c, end]
      for each chunk not square (c = T / 2CP; end: the chunk's last position + 1); a GPU runs them with no mask"""
    T, e, B, L = cfg.seq_length, act_bytes, micro_batch, cfg.num_layers
    n = per_token * B * T / cp
    if cp > 1 and recompute != "blocks":
        n += L * B * (2 * (T - T // cp) + T // cp) * cfg.hidden_size // tp * e
        if cpu_rank is not None:
            c = T // (2 * cp)
            n += L * sum(c * end for end in ((cpu_rank + 1) * c, (2 * cp - cpu_rank) * c) if end != c) * e
    return round(n)


def by_context_parallel(cfg: ModelConfig, micro_batch: int, cps=(1, 2, 4)) -> list[dict]:
    """Rank 0's saved activations by CP degree (on this CPU), without recomputation and with activation
    checkpointing, each against predicted_saved_bytes from the CP=1 measurement and as a fraction of CP=1's."""
    rows = []
    for recompute in ("none", "blocks"):
        base = None
        for cp in cps:
            args = (cfg, 1, False, micro_batch, recompute, False, False, cp)
            n = run_ranks(cp, rank_activation_bytes, *args)[0] if cp > 1 else rank_activation_bytes(*args)
            base = base or n
            predicted = predicted_saved_bytes(cfg, base / (micro_batch * cfg.seq_length), cp, recompute, micro_batch,
                                              cpu_rank=0)
            rows.append({"layout": f"cp{cp}", "recompute": recompute, "activation_mb": n / 2**20, "vs_cp1": n / base,
                         "ideal": 1 / cp, "predicted_mb": predicted / 2**20, "error": n / predicted - 1})
    return rows


GPU_HEADROOM = 0.9  # of its memory: the CUDA context, NCCL's buffers and the allocator's fragmentation take the rest


def long_context_fit(cfg: ModelConfig, contexts, gpu_gb: float = 80.0, gpus: int = 8, cps=(1, 2, 4, 8),
                     measure_at: int = 1024) -> list[dict]:
    """Peak memory per GPU of `cfg` at each context and CP degree in bf16 (TP = PP = 1, micro-batch 1), without
    recomputation and with activation checkpointing, from its saved activations per token measured in bf16 at
    `measure_at` tokens (they scale exactly with the tokens) and predicted_saved_bytes, plus
      transients at the start of backward: the logits' bf16 gradient [T / CP, V] beside their fp32 softmax (saved);
      with activation checkpointing one block's activations recomputed, its gathered K and V included
      states: bf16 weights 2P, fp32 gradient accumulation 4P, fp32 master weights and Adam's moments 12P over the
      `gpus` ranks of ZeRO-1's group (DP x CP)
    fits: within GPU_HEADROOM of `gpu_gb`."""
    short = replace(cfg, seq_length=measure_at)
    per_token = {rc: rank_activation_bytes(short, 1, False, 1, rc, dtype=torch.bfloat16) / measure_at
                 for rc in ("none", "blocks")}
    layer = (per_token["none"] - per_token["blocks"]) / cfg.num_layers  # one block's, per token
    P, e = count_params(cfg)["params"], 2
    states = 2 * P + 4 * P + 12 * P / gpus
    rows = []
    for T in contexts:
        long = replace(cfg, seq_length=T)
        for cp in cps:
            for rc in ("none", "blocks"):
                saved = predicted_saved_bytes(long, per_token[rc], cp, rc, act_bytes=e)
                transient = T / cp * cfg.vocab_size * e
                if rc == "blocks":
                    transient += layer * T / cp + (2 * T * cfg.hidden_size * e if cp > 1 else 0)
                total = states + saved + transient
                rows.append({"context": T, "cp": cp, "recompute": rc, "states_gb": states / 1e9,
                             "activations_gb": (saved + transient) / 1e9, "total_gb": total / 1e9,
                             "fits": total <= GPU_HEADROOM * gpu_gb * 1e9})
    return rows


def gpu_activation_peak(cfg: ModelConfig, recompute: str) -> int:
    """One bf16 forward and backward of micro-batch 1 on the GPU: the peak bytes allocated beyond the weights and
    their gradients, what long_context_fit's activations (saved and transient) predict at CP=1."""
    model = build_model(cfg, 0).to("cuda", torch.bfloat16)
    model.activation_checkpointing = recompute == "blocks"
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_length), device="cuda")
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(tokens, tokens).backward()
    return torch.cuda.max_memory_allocated() - 2 * weights  # the gradients: as many bytes as the weights
