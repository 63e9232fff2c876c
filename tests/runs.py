"""Run the real trainer in this process (one rank of a run_ranks world, or alone) and return its history."""
from __future__ import annotations


def train(overrides: dict, config: str = "configs/debug.yaml") -> list[dict]:
    from tokenformer_mp.train import train_history
    return train_history(config, overrides)


def evaluate_after_load(overrides: dict, config: str = "configs/debug.yaml") -> float:
    """Build the trainer at its layout, load the checkpoint named by checkpoint.load, return the validation loss."""
    import torch.distributed as dist

    from tokenformer_mp.config import load_config
    from tokenformer_mp.train import Trainer

    trainer = Trainer(load_config(config, overrides))
    trainer.maybe_resume()
    loss = trainer.evaluate()
    dist.barrier()
    dist.destroy_process_group()
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    return loss
