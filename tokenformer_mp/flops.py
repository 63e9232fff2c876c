"""The denominators of MFU: the matrix-multiply throughput this device reaches in this dtype, measured, and, on the
GPUs people compare against, the datasheet's dense bf16 peak (as Megatron and torchtitan report it)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; the most specific name first.
DATASHEET_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
)


def datasheet_bf16_peak(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a known GPU, None for any other device (MFU against it is then unknown)."""
    return next((peak for key, peak in DATASHEET_BF16 if key in device_name), None)


@dataclass
class MatmulPeak:
    """Readings of the matmul throughput (FLOP/s), each the best of a few short windows. The peak is the best
    reading: another process or a clock change only ever lowers a reading. `spread` (worst over best) says how noisy
    the machine was while they were taken."""
    readings: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return max(self.readings)

    @property
    def spread(self) -> float:
        return min(self.readings) / self.best

    def summary(self) -> dict:
        return {"matmul_peak_flops": self.best, "matmul_peak_readings": len(self.readings),
                "matmul_peak_spread": self.spread, "matmul_peak_median": statistics.median(self.readings)}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int] | None = None,
                         seconds: float = 0.6, windows: int = 6) -> float:
    """FLOP/s of [m, k] @ [k, n] in this process (its threads, its dtype): the best of several short windows. `shape`:
    the training step's own largest matmul; default a square one that saturates the device."""
    if shape is None:
        s = 8192 if device.type == "cuda" else 1024
        shape = (s, s, s)
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    a @ b  # warm-up
    sync()
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            count += 1
            sync()
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
    return best


def format_mfu(mfu: float) -> str:
    """'43.1%'; above 1 it is a measurement defect (the measured peak read low), and says so."""
    return f"{mfu:.1%}" if mfu <= 1.0 else f"{mfu:.1%} (above 100%: the measured matmul peak read low)"
