"""File writes that never leave a half-written file or directory that looks whole: written under a temporary name,
renamed when complete. A leaf module (no torch): tools and the GPU check's torch-free parent use it."""
from __future__ import annotations

import contextlib
import os
import shutil


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: str):
    """Yield a temporary directory that replaces out_dir once the block completes: never a half-written export."""
    partial = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
