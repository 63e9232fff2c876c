"""Pattention forward+backward against an equal-shape Linear -> GELU -> Linear MLP, and what its overhead is made of."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import NORM_EPS, Pattention, _row_dot
from ..parallel.launch import hold_freed_host_memory


def _time_fwd_bwd(module: nn.Module, x: torch.Tensor, iters: int) -> float:
    def run():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    def sync():  # GPU kernels run asynchronously: time them to completion
        if x.is_cuda:
            torch.cuda.synchronize()
    run()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    sync()
    return (time.perf_counter() - start) / iters


def compare(tokens: int, d_in: int, n: int, d_out: int, iters: int = 10, rounds: int = 5,
            device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Pattention (eager, and with its compiled kernels) and the MLP timed side by side; the ratio is the figure
    against the 1.10 target."""
    pat, mlp, x = _setup(tokens, d_in, n, d_out, device, dtype)
    fused = copy.deepcopy(pat)
    fused.fused = True
    tp, tf, tm = _best_of_rounds([pat, fused, mlp], x, iters, rounds)
    return {"shape": f"T={tokens} d_in={d_in} n={n} d_out={d_out}", "device": device, "dtype": str(dtype)[6:],
            "pattention_ms": tp * 1e3, "fused_ms": tf * 1e3, "mlp_ms": tm * 1e3, "ratio": tp / tm,
            "fused_ratio": tf / tm}


def _setup(tokens, d_in, n, d_out, device, dtype):
    if device == "cpu":
        hold_freed_host_memory()  # as in training (parallel.launch): one allocator state for both sides
    torch.manual_seed(0)
    pat = Pattention(d_in, d_out, n).to(device, dtype)
    mlp = nn.Sequential(nn.Linear(d_in, n, bias=False), nn.GELU(), nn.Linear(n, d_out, bias=False)).to(device, dtype)
    return pat, mlp, torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)


def _best_of_rounds(modules, x, iters, rounds) -> list[float]:
    """Interleaved rounds, best of each: all see the same machine state."""
    times = [[] for _ in modules]
    for _ in range(rounds):
        for t, m in zip(times, modules):
            t.append(_time_fwd_bwd(m, x, iters))
    return [min(t) for t in times]


class _Pieces(torch.autograd.Function):
    """The l2_norm_gelu kernel with its extra passes switched on one at a time: level 0 is a plain GELU between the
    two matmuls, 1 adds the forward norm and scaling, 2 the backward's row dot, 3 its correction (the real maths)."""

    @staticmethod
    def forward(ctx, x, keys, tau: float, level: int):
        z = x @ keys.t()
        scale = torch.ones_like(z[..., :1])
        if level >= 1:
            scale = tau / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(NORM_EPS)
            z.mul_(scale)
        ctx.save_for_backward(x, keys, z, scale)
        ctx.tau, ctx.level = tau, level
        return F.gelu(z)

    @staticmethod
    def backward(ctx, grad_out):
        x, keys, z, scale = ctx.saved_tensors
        dz = torch.ops.aten.gelu_backward(grad_out, z)
        if ctx.level >= 2:
            coef = _row_dot(dz, z, scale.dtype) / ctx.tau**2
            if ctx.level >= 3:
                dz.addcmul_(z, coef, value=-1.0)
        if ctx.level == 0:
            return dz @ keys, dz.t() @ x, None, None
        return (dz @ keys).mul_(scale), dz.t() @ (x * scale), None, None


class _PiecesOf(nn.Module):
    def __init__(self, pat: Pattention, level: int):
        super().__init__()
        self.pat, self.level = pat, level

    def forward(self, x):
        return _Pieces.apply(x, self.pat.key_tokens, self.pat.tau, self.level) @ self.pat.value_tokens


PIECES = ["Pattention's layout, plain GELU", "+ forward norm and scaling", "+ backward row dot",
          "+ backward correction (the maths in full)"]


def breakdown(tokens: int, d_in: int, n: int, d_out: int, iters: int = 10, rounds: int = 15, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> list[dict]:
    """Pattention's time over the MLP's, its extra passes added one at a time ([tokens, d_in] inputs, 2-D only)."""
    pat, mlp, x = _setup(tokens, d_in, n, d_out, device, dtype)
    names = ["MLP: Linear -> GELU -> Linear", *PIECES, "Pattention (tokenformer_mp.model)"]
    times = _best_of_rounds([mlp, *(_PiecesOf(pat, level) for level in range(len(PIECES))), pat], x, iters, rounds)
    return [{"variant": v, "ms": t * 1e3, "ratio": t / times[0]} for v, t in zip(names, times)]


SHAPES = [(2048, 768, 3072, 768), (2048, 768, 768, 768), (1024, 1024, 4096, 1024), (4096, 128, 512, 128)]
