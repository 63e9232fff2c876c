"""The machine a run of the GPU check found: versions, the device, and its matmul throughput (part a)."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from ..flops import datasheet_bf16_peak, measure_matmul_flops

PACKAGES = ("deepspeed", "megatron-core", "triton", "transformers", "numpy", "sentencepiece", "tokenizers")


def describe() -> dict:
    """One row: Python, torch, CUDA, NCCL, the GPU (or CPU), the installed packages that matter, and the best
    reading of an 8192^3 bf16 matmul on a GPU (1024^3 fp32 on a CPU) in TFLOP/s."""
    cuda = torch.cuda.is_available()
    row = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": torch.cuda.device_count() if cuda else 0}
    for name in PACKAGES:
        try:
            row[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            row[name] = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        peak = datasheet_bf16_peak(props.name)
        row.update(device=props.name, memory_gb=round(props.total_memory / 1e9, 1),
                   capability=f"{props.major}.{props.minor}", nccl=_version(torch.cuda.nccl.version),
                   cudnn=_version(torch.backends.cudnn.version), bf16=torch.cuda.is_bf16_supported(),
                   datasheet_tflops=peak / 1e12 if peak else None)
        device, dtype = torch.device("cuda", 0), torch.bfloat16
    else:
        row.update(device=platform.processor() or platform.machine(), cpus=len(os.sched_getaffinity(0)))
        device, dtype = torch.device("cpu"), torch.float32
    row["matmul_dtype"] = str(dtype).removeprefix("torch.")
    row["matmul_tflops"] = measure_matmul_flops(device, dtype) / 1e12
    return row


def _version(ask) -> str:
    """A library's version as text; what went wrong instead of an exception (this row decides the check's course)."""
    try:
        v = ask()
        return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    except Exception as e:  # noqa: BLE001 (a version we cannot read is a fact to record, not a reason to stop)
        return f"unknown ({type(e).__name__}: {e})"
