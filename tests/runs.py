"""Run the real trainer in this process (one rank of a run_ranks world, or alone), on its data or on data that fails."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch


def train(overrides: dict, config: str = "configs/debug.yaml") -> list[dict]:
    from tokenformer_mp.trainer import train_history
    return train_history(config, overrides)


def evaluate_after_load(overrides: dict, config: str = "configs/debug.yaml") -> float:
    """Build the trainer at its layout, load the checkpoint named by checkpoint.load, return the validation loss."""
    from tokenformer_mp.trainer import evaluate_checkpoint
    return evaluate_checkpoint(config, overrides)


def train_deterministic(overrides: dict, config: str = "configs/debug.yaml") -> list[dict]:
    """train() under PyTorch's deterministic algorithms (and a fixed cuBLAS workspace), so that two runs on a GPU can
    be equal bit for bit: without them the embedding's and attention's backward add in a varying order."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when the cuBLAS handle is made
    torch.use_deterministic_algorithms(True, warn_only=True)
    return train(overrides, config)


class FaultyDataset:
    """A training dataset whose sample `at` fails as damaged data does ('raise': an IndexError, as from a garbled
    index cache) or a stuck file system ('block': it comes an hour later, or at release.set(); `flag` is created
    when the read starts)."""

    def __init__(self, ds, at: int, fault: str, flag: str):
        self.ds, self.at, self.fault, self.flag, self.release = ds, at, fault, flag, threading.Event()

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        if i == self.at:
            if self.fault == "raise":
                raise IndexError(f"index {i} is out of bounds (injected)")
            Path(self.flag).touch()
            self.release.wait(3600)
        return self.ds[i]


def main_with_faulty_data(argv: list[str], at: int, fault: str, flag: str) -> int:
    """The trainer's main() (python -m tokenformer_mp.train) on a FaultyDataset of the data it was given."""
    from tokenformer_mp import train, trainer

    build = trainer.build_datasets  # patched where the trainer calls it

    def faulty(*args, **kw):
        train_ds, *rest = build(*args, **kw)
        return (FaultyDataset(train_ds, at, fault, flag), *rest)

    trainer.build_datasets = faulty
    return train.main(argv)


def main_with_stuck_forward(argv: list[str], rank: int, call: int) -> int:
    """The trainer's main() where rank `rank`'s `call`-th model forward never returns (it sleeps an hour): a rank
    stuck in its compute while the others wait for it in a collective."""
    from tokenformer_mp import model, train

    forward, calls = model.TokenFormer.forward, [0]

    def stuck(self, *args, **kw):
        calls[0] += 1
        if int(os.environ["RANK"]) == rank and calls[0] == call:
            time.sleep(3600)
        return forward(self, *args, **kw)

    model.TokenFormer.forward = stuck
    return train.main(argv)


def train_with_slow_rank(overrides: dict, rank: int, delay_s: float, config: str = "configs/debug.yaml") -> list[dict]:
    """train(), with global rank `rank` sleeping `delay_s` before every forward of its model: a slow GPU or node."""
    import torch.distributed as dist

    from tokenformer_mp.config import load_config
    from tokenformer_mp.trainer import Trainer, shutdown

    trainer = Trainer(load_config(config, overrides))
    if dist.get_rank() == rank:
        trainer.model.register_forward_pre_hook(lambda module, args: time.sleep(delay_s))
    trainer.fit()
    shutdown()
    return trainer.history


class SpikyDataset:
    """A training dataset whose samples in `bad` ranges [a, b) hold one token repeated (its text and its labels): a
    batch of them makes the loss and the gradient jump, as a corrupt shard does."""

    def __init__(self, ds, bad: list[tuple[int, int]], token: int = 7):
        self.ds, self.bad, self.token = ds, bad, token

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        sample = self.ds[i]
        if any(a <= i < b for a, b in self.bad):
            sample = dict(sample)
            for key in ("tokens", "labels"):
                sample[key] = torch.full_like(sample[key], self.token)
        return sample


def _with_spiky_data(bad: list[tuple[int, int]]):
    from tokenformer_mp import trainer

    build = trainer.build_datasets  # patched where the trainer calls it

    def spiky(*args, **kw):
        train_ds, *rest = build(*args, **kw)
        return (SpikyDataset(train_ds, bad), *rest)

    trainer.build_datasets = spiky


def train_with_spikes(overrides: dict, bad: list[tuple[int, int]], config: str = "configs/debug.yaml") -> dict:
    """train() on the config's data with the samples in `bad` spiky; the history, the skipped sample ranges and the
    first sample each step 0..steps-1 reads now."""
    from tokenformer_mp.config import load_config
    from tokenformer_mp.trainer import Trainer, shutdown

    _with_spiky_data(bad)
    trainer = Trainer(load_config(config, overrides))
    trainer.fit()
    starts = [trainer.train_batches.start_of(s) for s in range(trainer.cfg.train.steps)]
    shutdown()
    return {"history": trainer.history, "skipped": trainer.train_batches.skipped, "starts": starts}


def main_with_spikes(argv: list[str], bad: list[tuple[int, int]]) -> int:
    """The trainer's main() with the samples in `bad` spiky."""
    from tokenformer_mp import train

    _with_spiky_data(bad)
    return train.main(argv)
