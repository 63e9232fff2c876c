"""Run the real trainer in this process (one rank of a run_ranks world, or alone) and return its history."""
from __future__ import annotations

import os

import torch


def train(overrides: dict, config: str = "configs/debug.yaml") -> list[dict]:
    from tokenformer_mp.train import train_history
    return train_history(config, overrides)


def evaluate_after_load(overrides: dict, config: str = "configs/debug.yaml") -> float:
    """Build the trainer at its layout, load the checkpoint named by checkpoint.load, return the validation loss."""
    from tokenformer_mp.config import load_config
    from tokenformer_mp.train import Trainer, shutdown

    trainer = Trainer(load_config(config, overrides))
    trainer.maybe_resume()
    loss = trainer.evaluate()
    shutdown()
    return loss


def train_deterministic(overrides: dict, config: str = "configs/debug.yaml") -> list[dict]:
    """train() under PyTorch's deterministic algorithms (and a fixed cuBLAS workspace), so that two runs on a GPU can
    be equal bit for bit: without them the embedding's and attention's backward add in a varying order."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when the cuBLAS handle is made
    torch.use_deterministic_algorithms(True, warn_only=True)
    return train(overrides, config)
