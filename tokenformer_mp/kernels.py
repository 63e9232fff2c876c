"""Pattention's l2_norm_gelu elementwise work as compiled kernels (opt-in: train.fused_pattention).

Eager PyTorch spends some 15 memory passes over the [tokens, n] scores of one Pattention: the norm, the scaling and
the GELU forward; GELU', the row dot and the correction backward. An MLP's GELU costs 5. Compiled (torch.compile:
Triton on a GPU, C++ on a CPU), the forward is one kernel that reads the scores once and writes the GELU, and the
backward one more that reads the scores and the incoming gradient and writes dL/dA: 5 passes, as the MLP, where a
row fits one kernel's reduction. When the parameter tokens are sharded (TP > 1) each splits in two around the
all-reduce of its row statistic.

The unscaled scores are kept for backward and scaled again there, in fp32 whatever the input dtype. On a CPU, ATen's
own vectorised GELU beats inductor's code, so eager stays the default there (README, Benchmarks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_gelu_backward = torch.ops.aten.gelu_backward
_compile = torch.compile(fullgraph=True, dynamic=None)


def _scale(norm: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    return tau / norm.clamp_min(eps)


def _dot(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum(gelu'(s z) g * s z) per row ([..., 1] fp32): what the norm's Jacobian needs."""
    zs = z.float() * scale
    return (_gelu_backward(grad.float(), zs) * zs).sum(-1, keepdim=True)


def _corrected(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """dL/dA / scale = gelu'(s z) g - coef s z: the norm's Jacobian removes each row's radial part."""
    zs = z.float() * scale
    return (_gelu_backward(grad.float(), zs) - coef * zs).to(z.dtype)


@_compile
def forward_local(z: torch.Tensor, tau: float, eps: float):
    """Unsharded: [..., n] -> gelu(tau z / ||z||), with the row scale and norm ([..., 1] fp32) for backward."""
    norm = z.float().square().sum(-1, keepdim=True).sqrt()
    scale = _scale(norm, tau, eps)
    return F.gelu(z.float() * scale).to(z.dtype), scale, norm


@_compile
def scaled_gelu(z: torch.Tensor, norm: torch.Tensor, tau: float, eps: float):
    """Sharded: gelu(scale z) from the all-reduced norm."""
    scale = _scale(norm, tau, eps)
    return F.gelu(z.float() * scale).to(z.dtype), scale


@_compile
def backward_local(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, norm: torch.Tensor, tau: float,
                   eps: float) -> torch.Tensor:
    coef = torch.where(norm > eps, _dot(grad, z, scale) / tau**2, 0.0)
    return _corrected(grad, z, scale, coef)


row_dot = _compile(_dot)  # sharded: this shard's part, all-reduced between the two kernels
corrected = _compile(_corrected)
