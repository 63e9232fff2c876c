"""What a checkpoint directory is made of, and whether a path is one: a leaf without torch, so that the config checks
checkpoint.load before anything heavy is imported (tokenformer_mp.checkpoint holds the format itself)."""
from __future__ import annotations

import os
import re

LATEST = "latest"  # a run's checkpoints/: the file naming its newest complete checkpoint
MANIFEST = "manifest.json"  # a layout-free checkpoint: written last, its completion record
TAG = re.compile(r"global_step(\d+)$")


def is_run_checkpoints(path: str) -> bool:
    """A trainer's checkpoints/ directory: it holds `latest` or global_step* directories."""
    try:
        return os.path.exists(os.path.join(path, LATEST)) or any(
            TAG.match(n) and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))
    except OSError:  # not a directory, or not ours to list
        return False


def is_checkpoint(path: str) -> bool:
    """What load_checkpoint reads: a layout-free checkpoint, or a run's checkpoints/ directory."""
    return os.path.exists(os.path.join(path, MANIFEST)) or is_run_checkpoints(path)
