"""Count the bytes every torch.distributed collective moves, per process group, during a benchmark run.

Measurement harness only: it wraps torch.distributed's functions for the duration of a `with` block.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist

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


@contextlib.contextmanager
def count_collectives():
    """Yields {group ranks tuple: bytes}. Scalars (grad-norm and overflow bookkeeping) are not counted."""
    counts: dict[tuple, int] = defaultdict(int)
    originals = {op: getattr(dist, op) for op in _OPS if hasattr(dist, op)}

    def wrap(op, fn):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
            counts[(op, ranks)] += _size(op, args, kwargs)
            return fn(*args, **kwargs)
        return counted

    # DeepSpeed's torch backend keeps its own references to two of them (ZeRO's gathers of updated parameters, the
    # pipeline engine's of partitioned activations): wrapped where it holds them
    import deepspeed.comm.comm as ds_comm
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


def rank_bytes_per_step(cfg, dp: int, stage: int, stage_layers: int, params: int,
                        elem_bytes: int = 4) -> dict[str, int]:
    """Analytic bytes one rank moves per optimizer step in the counter's convention (full-tensor bytes per
    collective, sends and receives each counted, scalars and groups of one rank left out), by what moves them, for
    DeepSpeed 0.19 driving this model in fp32. `stage`: this rank's pipeline stage, holding `stage_layers` blocks;
    `params`: the parameters this rank holds (ZeRO's flat buffer). M micro-batches of b tokens, hidden h:
      tp    tensor_parallel.tp_bytes_per_step for this stage's blocks, embedding and head, plus, without sequence
            parallelism, DeepSpeed's partitioned pipe tensors: a stage receiving activations all-gathers each
            (M b h), a stage sending them all-gathers its kept outputs and the gradients it receives (2 M b h)
      p2p   per neighbour, M activations one way and M gradients the other: b h each, or b h / TP plus a 7 + TP int64
            partition header when partitioned, or b h / TP under sequence parallelism (each rank's own slice)
      tied  the first and last stages all-reduce the tied embedding's gradient, V / TP rows of h
      loss  the last stage broadcasts 2 floats of loss over the pipeline
      dp    ZeRO all-reduces the gradients (once per step at stage 1, per micro-batch at stage 2) and all-gathers the
            updated parameters, padded to a multiple of 2 x DP elements
    """
    from ..parallel.tensor_parallel import tp_bytes_per_step
    m, t, par = cfg.model, cfg.train, cfg.parallel
    M, b, h, e = t.grad_accum_steps, t.micro_batch_size * m.seq_length, m.hidden_size, elem_bytes
    first, last = stage == 0, stage == par.pp - 1
    sp = par.sequence_parallel and par.tp > 1
    partitioned = par.tp > 1 and not sp  # DeepSpeed's pipe_partitioned / grad_partitioned (train.deepspeed_config)
    out = {"tp": tp_bytes_per_step(stage_layers, h, b, M, par.tp, e, sp, embedding=first, head=last),
           "p2p": 0, "tied": 0, "loss": 0, "dp": 0}
    if par.pp > 1:
        if partitioned:
            out["tp"] += ((not first) + 2 * (not last)) * M * b * h * e
        message = b * h * e // par.tp + (7 + par.tp) * 8 * partitioned if par.tp > 1 else b * h * e
        out["p2p"] = 2 * M * message * ((not first) + (not last))
        out["tied"] = (first or last) * m.vocab_size // par.tp * h * e
        out["loss"] = 2 * 4
    if dp > 1:
        reductions = M if par.zero_stage == 2 else 1
        align = 2 * dp
        out["dp"] = (reductions * params + -(-params // align) * align) * e
    return out
