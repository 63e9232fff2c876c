"""Pattention's l2_norm_gelu elementwise work as compiled kernels (opt-in: train.fused_pattention).

Eager PyTorch spends some 15 memory passes over the [tokens, n] scores of one Pattention: the norm, the scaling and
the GELU forward; GELU', the row dot and the correction backward. An MLP's GELU costs 5. Compiled (torch.compile:
Triton on a GPU, C++ on a CPU), the forward is one kernel that reads the scores once and writes the GELU, and the
backward one more that reads the scores and the incoming gradient and writes dL/dA: 5 passes, as the MLP, where a
row fits one kernel's reduction. When the parameter tokens are sharded (TP > 1) each splits in two around the
all-reduce of its row statistic.

The unscaled scores are kept for backward and scaled again there, in fp32 whatever the input dtype. On a CPU, ATen's
own vectorised GELU beats inductor's code, so eager stays the default there (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_gelu_backward = torch.ops.aten.gelu_backward
# Static shapes: a kernel specialised to each width. dynamic=None would turn the second width it meets (another
# Pattention kind, an uneven TP shard) into one dynamic kernel with looped two-pass reductions. A model meets at most
# 6 widths (qkv, proj and ffn tokens per TP shard, two shard sizes each where uneven) in one or two dtypes and
# micro-batch shapes: 32 compilations per kernel leave room for that (torch's default limit is 8).
RECOMPILE_LIMIT = 32
_PER_FUNCTION_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters  # PyTorch 2.13+
_eager = False  # set when a compilation fails (no Triton, no C++ compiler): every kernel runs eager from then on


def _compile(fn, backend="inductor"):
    """fn compiled for static shapes, falling back to eager (with one warning for all kernels) where it cannot be."""
    if _PER_FUNCTION_LIMIT:
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, recompile_limit=RECOMPILE_LIMIT)
    else:  # PyTorch before 2.13 has only the process-wide limit: raised, never lowered
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

    @functools.wraps(fn)
    def run(*args):
        global _eager
        if not _eager and not torch.compiler.is_compiling():  # inside train.compile's graph: traced as eager code
            try:
                return compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # inductor's errors included (InductorError)
                _eager = True
                cause = getattr(e, "inner_exception", e)
                log.warning("train.fused_pattention: compiling the Pattention kernels failed, running them eager "
                            "(same maths, more memory passes): %s: %s", type(cause).__name__,
                            str(cause).split("\n")[0])
        return fn(*args)
    return run


def _gelu_of(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """gelu(s z) in fp32, in z's dtype."""
    return F.gelu(z.float() * scale).to(z.dtype)


def _scaled(z: torch.Tensor, norm: torch.Tensor, tau: float, eps: float):
    """(gelu(s z), s) with s = tau / ||z|| per row."""
    scale = tau / norm.clamp_min(eps)
    return _gelu_of(z, scale), scale


def _dot(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum(gelu'(s z) g * s z) per row ([..., 1] fp32): what the norm's Jacobian needs."""
    zs = z.float() * scale
    return (_gelu_backward(grad.float(), zs) * zs).sum(-1, keepdim=True)


def _correct(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """dL/dA / scale = gelu'(s z) g - coef s z: the norm's Jacobian removes each row's radial part."""
    zs = z.float() * scale
    return (_gelu_backward(grad.float(), zs) - coef * zs).to(z.dtype)


def _coef(dot: torch.Tensor, norm: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    return torch.where(norm > eps, dot / tau**2, 0.0)  # an all-zero row (norm under eps) stays unscaled


@_compile
def _forward_local(z: torch.Tensor, tau: float, eps: float):
    norm = z.float().square().sum(-1, keepdim=True).sqrt()
    return (*_scaled(z, norm, tau, eps), norm)


@_compile
def _backward_local(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, norm: torch.Tensor, tau: float,
                    eps: float) -> torch.Tensor:
    return _correct(grad, z, scale, _coef(_dot(grad, z, scale), norm, tau, eps))


_scaled_kernel, _dot_kernel, _correct_kernel = _compile(_scaled), _compile(_dot), _compile(_correct)
gelu_scaled = _compile(_gelu_of)  # the forward's weights again, from the unscaled scores and the saved scale


def forward(z: torch.Tensor, tau: float, eps: float, reduce, sharded: bool):
    """[..., n] scores -> (gelu(tau z / ||z||), scale, norm), the last two [..., 1] fp32. `reduce` sums a row
    statistic over the shards of the token axis."""
    if not sharded:
        return _forward_local(z, tau, eps)
    norm = reduce(torch.linalg.vector_norm(z, dim=-1, keepdim=True, dtype=torch.float32).square_()).sqrt_()
    return (*_scaled_kernel(z, norm, tau, eps), norm)


def backward(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, norm: torch.Tensor, tau: float, eps: float,
             reduce, sharded: bool) -> torch.Tensor:
    """dL/dA / scale, from the gradient of the GELU's output and the unscaled scores."""
    if not sharded:
        return _backward_local(grad, z, scale, norm, tau, eps)
    return _correct_kernel(grad, z, scale, _coef(reduce(_dot_kernel(grad, z, scale)), norm, tau, eps))
