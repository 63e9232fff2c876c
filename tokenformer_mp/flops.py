"""The denominator of MFU: the matrix-multiply throughput this device actually reaches in this dtype, measured."""
from __future__ import annotations

import time

import torch


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.6,
                         windows: int = 6) -> float:
    """The best of several short windows: a window shared with another process only lowers its own figure."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    a @ b  # warm-up
    sync()
    best = 0.0
    for _ in range(windows):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            n += 1
            sync()
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best
