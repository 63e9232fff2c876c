"""Count the bytes every torch.distributed collective moves, per process group, during a benchmark run.

Measurement harness only: it wraps torch.distributed's functions for the duration of a `with` block.
"""
from __future__ import annotations

import contextlib
import sys
from collections import defaultdict

import deepspeed.comm.comm as ds_comm
import torch
import torch.distributed as dist

from ..parallel.context_parallel import cp_bytes_per_step
from ..parallel.tensor_parallel import tp_bytes_per_step

_OPS = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single", "all_gather_into_tensor",
        "all_gather", "broadcast", "send", "recv", "isend", "irecv", "reduce_scatter", "batch_isend_irecv", "reduce",
        "all_reduce_coalesced", "gather", "scatter", "all_to_all", "all_to_all_single")


def _size(op: str, args, kwargs) -> int:
    """Bytes of the full (unsharded) tensor of the collective: what the analytic count in the README counts."""
    if op in ("reduce_scatter_single", "reduce_scatter_tensor"):
        t = kwargs.get("input", args[1] if len(args) > 1 else None)
    elif op in ("all_gather_single", "all_gather_into_tensor"):
        t = kwargs.get("output_tensor", args[0] if args else None)
    elif op in ("all_gather", "reduce_scatter"):
        lst = args[0] if args else None
        return sum(x.numel() * x.element_size() for x in lst) if lst else 0
    elif op == "batch_isend_irecv":
        return sum(p.tensor.numel() * p.tensor.element_size() for p in args[0])
    else:
        t = kwargs.get("tensor", args[0] if args else None)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) and t.numel() > 1 else 0


class Counts(defaultdict):
    """{(op, group ranks): bytes}, and `by_caller` {(group ranks, module that called torch.distributed): bytes}: the
    model's own collectives (tokenformer_mp.parallel.*) apart from DeepSpeed's where both use one group (under
    context parallelism at DP=1 the CP group is the data-parallel one)."""

    def __init__(self):
        super().__init__(int)
        self.by_caller: dict[tuple, int] = defaultdict(int)


@contextlib.contextmanager
def count_collectives():
    """Yields Counts. Scalars (grad-norm and overflow bookkeeping) are not counted."""
    counts = Counts()
    originals = {op: getattr(dist, op) for op in _OPS if hasattr(dist, op)}

    def wrap(op, fn):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
            n = _size(op, args, kwargs)
            counts[(op, ranks)] += n
            counts.by_caller[(ranks, sys._getframe(1).f_globals.get("__name__"))] += n
            return fn(*args, **kwargs)
        return counted

    # DeepSpeed's torch backend keeps its own references to two of them (ZeRO's gathers of updated parameters, the
    # pipeline engine's of partitioned activations): wrapped where it holds them
    backend = ds_comm.cdb
    held = {a: getattr(backend, a) for a in ("all_gather_function", "reduce_scatter_function")
            if backend is not None and callable(getattr(backend, a, None))}
    for op, fn in originals.items():
        setattr(dist, op, wrap(op, fn))
    for attr, fn in held.items():
        setattr(backend, attr, wrap(fn.__name__, fn))
    try:
        yield counts
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)
        for attr, fn in held.items():
            setattr(backend, attr, fn)


# Bytes of an element by precision: activations and the model's (low-precision) weights; the fp32 master copy keeps
# gradient accumulation in fp32 under bf16 (train.deepspeed_config), so the tied embedding's gradient is fp32 too.
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}


def rank_bytes_per_step(cfg, dp: int, stage: int, stage_layers: int, params: int,
                        precision: str = "fp32") -> dict[str, int] | None:
    """Analytic bytes one rank moves per optimizer step in the counter's convention (full-tensor bytes per
    collective, sends and receives each counted, scalars and groups of one rank left out), by what moves them, for
    DeepSpeed 0.19 driving this model in fp32 or bf16 (None for fp16: not modelled). `stage`: this rank's pipeline
    stage, holding `stage_layers` blocks; `params`: the parameters this rank holds (ZeRO's flat buffer). M
    micro-batches of b tokens on this rank (a CP rank's chunks: micro_batch_size x seq_length / CP), hidden h,
    activations of e bytes (4 in fp32, 2 in bf16):
      tp    tensor_parallel.tp_bytes_per_step for this stage's blocks, embedding and head, plus, without sequence
            parallelism, DeepSpeed's partitioned pipe tensors: a stage receiving activations all-gathers each
            (M b h e), a stage sending them all-gathers its kept outputs and the gradients it receives (2 M b h e)
      p2p   per neighbour, M activations one way and M gradients the other: b h e each, or b h e / TP plus a 7 + TP
            int64 partition header when partitioned, or b h e / TP under sequence parallelism (each rank's own
            slice); with positions carried (data.reset_position_ids, data.reset_attention_mask, parallel.cp) also
            the int64 positions of this rank's b tokens forward, and with documents kept apart
            (data.reset_attention_mask) their ids, int64 for the whole sequence's B x T tokens
      tied  the first and last stages all-reduce the tied embedding's gradient, V / TP rows of h, in fp32
      loss  the last stage broadcasts 2 fp32 losses over the pipeline
      cp    context_parallel.cp_bytes_per_step for this stage's blocks: K and V gathered over the CP group
      dp    over the DP x CP ranks (DeepSpeed's data-parallel group): the gradients reduced (once per step at
            ZeRO-1, also by bf16's BF16_Optimizer; per micro-batch at ZeRO-2) in fp32, or in bf16 with
            parallel.grad_reduce_dtype bf16 under bf16, then the updated parameters all-gathered in the model's
            dtype, padded to a multiple of 2 x DP x CP elements
    """
    if precision not in ACTIVATION_BYTES:
        return None
    m, t, par = cfg.model, cfg.train, cfg.parallel
    cp = par.cp
    M, h, e = t.accum_steps(dp), m.hidden_size, ACTIVATION_BYTES[precision]
    b = t.micro_batch_size * m.seq_length // cp
    reduce_e = 2 if precision == "bf16" and par.grad_reduce_dtype == "bf16" else 4
    first, last = stage == 0, stage == par.pp - 1
    sp = par.sequence_parallel and par.tp > 1
    partitioned = par.tp > 1 and not sp  # DeepSpeed's pipe_partitioned / grad_partitioned (train.deepspeed_config)
    out = {"tp": tp_bytes_per_step(stage_layers, h, b, M, par.tp, e, sp, embedding=first, head=last, arch=m.arch),
           "p2p": 0, "tied": 0, "loss": 0,
           "cp": cp_bytes_per_step(stage_layers, h, b * cp, M, cp, par.tp, e, t.activation_checkpointing), "dp": 0}
    if par.pp > 1:
        if partitioned:
            out["tp"] += ((not first) + 2 * (not last)) * M * b * h * e
        message = b * h * e // par.tp + (7 + par.tp) * 8 * partitioned if par.tp > 1 else b * h * e
        extra = cfg.inputs_carry_positions() * b * 8
        extra += cfg.data.reset_attention_mask * t.micro_batch_size * m.seq_length * 8
        out["p2p"] = M * (2 * message + extra) * ((not first) + (not last))
        out["tied"] = (first or last) * m.vocab_size // par.tp * h * 4
        out["loss"] = 2 * 4
    if dp * cp > 1:
        reductions = M if par.zero_stage == 2 else 1
        align = 2 * dp * cp
        out["dp"] = reductions * params * reduce_e + -(-params // align) * align * e
    return out
