"""Count the bytes every torch.distributed collective moves, per process group, during a benchmark run.

Measurement harness only: it wraps torch.distributed's functions for the duration of a `with` block.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist

_OPS = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single", "all_gather_into_tensor",
        "all_gather", "broadcast", "send", "recv", "isend", "irecv", "reduce_scatter", "batch_isend_irecv")


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

    for op, fn in originals.items():
        setattr(dist, op, wrap(op, fn))
    try:
        yield counts
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)
