"""Pattention forward+backward against an equal-shape Linear -> GELU -> Linear MLP."""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..model import Pattention
from ..parallel.launch import hold_freed_host_memory


def _time_fwd_bwd(module: nn.Module, x: torch.Tensor, iters: int) -> float:
    def run():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters


def compare(tokens: int, d_in: int, n: int, d_out: int, iters: int = 10, rounds: int = 5,
            device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Interleaved rounds, best of each: both see the same machine state."""
    if device == "cpu":
        hold_freed_host_memory()  # as in training (parallel.launch): one allocator state for both sides
    torch.manual_seed(0)
    pat = Pattention(d_in, d_out, n).to(device, dtype)
    mlp = nn.Sequential(nn.Linear(d_in, n, bias=False), nn.GELU(), nn.Linear(n, d_out, bias=False)).to(device, dtype)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    tp, tm = [], []
    for _ in range(rounds):
        tp.append(_time_fwd_bwd(pat, x, iters))
        tm.append(_time_fwd_bwd(mlp, x, iters))
    return {"shape": f"T={tokens} d_in={d_in} n={n} d_out={d_out}", "pattention_ms": min(tp) * 1e3,
            "mlp_ms": min(tm) * 1e3, "ratio": min(tp) / min(tm)}


SHAPES = [(2048, 768, 3072, 768), (2048, 768, 768, 768), (1024, 1024, 4096, 1024), (4096, 128, 512, 128)]
