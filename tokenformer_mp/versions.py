"""The Python and PyTorch versions this project supports, checked at start (docs/training.md, Supported versions).

A cluster brings its own CUDA build of PyTorch: any from TORCH_MIN to the version requirements.txt pins is supported
(the suite runs under both ends on a CPU). Below the minimum: refused with one line. Newer: a warning, not a refusal.
"""
from __future__ import annotations

import sys
import warnings

PYTHON_SUPPORTED = ((3, 11), (3, 12))
TORCH_MIN = (2, 11)
TORCH_PINNED = (2, 13)  # requirements.txt


class UnsupportedVersion(RuntimeError):
    pass


def _major_minor(version: str) -> tuple[int, int]:
    """'2.11.0+cu130' -> (2, 11)."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check(torch_version: str | None = None, python: tuple[int, int] | None = None) -> list[str]:
    """Raise UnsupportedVersion below the minimum; return warnings for versions newer than tested."""
    if torch_version is None:
        import torch  # here: callers that only ask about Python need not pay torch's import (1-4 s)
        torch_version = torch.__version__
    py = python or sys.version_info[:2]
    lo, hi = PYTHON_SUPPORTED[0], PYTHON_SUPPORTED[-1]
    if py < lo:
        raise UnsupportedVersion(f"Python {py[0]}.{py[1]} is older than {lo[0]}.{lo[1]}, the oldest supported "
                                 f"(supported: {', '.join(f'{a}.{b}' for a, b in PYTHON_SUPPORTED)})")
    tv = _major_minor(torch_version)
    if tv < TORCH_MIN:
        raise UnsupportedVersion(f"PyTorch {torch_version} is older than {TORCH_MIN[0]}.{TORCH_MIN[1]}, the oldest "
                                 f"supported (supported: {TORCH_MIN[0]}.{TORCH_MIN[1]} to {TORCH_PINNED[0]}."
                                 f"{TORCH_PINNED[1]}): install a newer build for your CUDA")
    notes = []
    if py > hi:
        notes.append(f"Python {py[0]}.{py[1]} is newer than {hi[0]}.{hi[1]}, the newest tested")
    if tv > TORCH_PINNED:
        notes.append(f"PyTorch {torch_version} is newer than {TORCH_PINNED[0]}.{TORCH_PINNED[1]}, the newest tested")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return notes
