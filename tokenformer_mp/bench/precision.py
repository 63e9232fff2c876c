"""How far bf16 training drifts from fp32: the same run (same data, seed and schedule) in fp32, in bf16 as this
project trains it (gradients accumulated in fp32), and in bf16 with DeepSpeed's default for ZeRO, gradients summed
over the micro-batches in bf16."""
from __future__ import annotations

import tempfile

from ..config import load_config
from ..parallel.local import run_ranks
from ..trainer import Trainer, shutdown


class _Bf16Accumulation(Trainer):
    """DeepSpeed left at its default under bf16: the gradient accumulation dtype is the model's."""

    def deepspeed_config(self, rank_params: int) -> dict:
        ds = super().deepspeed_config(rank_params)
        ds["data_types"] = {"grad_accum_dtype": "bf16"}
        return ds


def _run(config: str, overrides: dict, bf16_accumulation: bool) -> dict:
    cls = _Bf16Accumulation if bf16_accumulation else Trainer
    trainer = cls(load_config(config, overrides))
    trainer.save = lambda: None  # measuring the loss, not checkpoints
    trainer.fit()
    out = {"loss": [h["loss"] for h in trainer.history], "val_loss": trainer.history[-1].get("val_loss"),
           "grad_accum_dtype": str(trainer.engine.get_data_types()[1]), "optimizer": type(trainer.optimizer).__name__}
    shutdown()
    return out


def _run_one(config: str, overrides: dict, bf16_accumulation: bool) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:  # not the config's: no resuming from a user's run
        return run_ranks(1, _run, config, {**overrides, "run_dir": run_dir}, bf16_accumulation)[0]


def drift(config: str, overrides: dict, steps: int = 50) -> list[dict]:
    """Per variant: the largest and the last relative difference of the training loss from fp32 over `steps` steps,
    and the final validation loss's."""
    base = {**overrides, "train.steps": steps, "train.eval_interval": steps, "train.device": "cpu"}
    runs = {"fp32": _run_one(config, {**base, "train.precision": "fp32"}, False),
            "bf16, fp32 accumulation": _run_one(config, {**base, "train.precision": "bf16"}, False),
            "bf16, bf16 accumulation": _run_one(config, {**base, "train.precision": "bf16"}, True)}
    ref = runs["fp32"]
    rows = []
    for name, r in runs.items():
        rel = [abs(a - b) / b for a, b in zip(r["loss"], ref["loss"])]
        rows.append({"variant": name, "optimizer": r["optimizer"], "grad_accum_dtype": r["grad_accum_dtype"],
                     "final_loss": r["loss"][-1], "max_rel_loss_diff": max(rel), "final_rel_loss_diff": rel[-1],
                     "val_loss": r["val_loss"], "val_rel_diff": abs(r["val_loss"] - ref["val_loss"]) / ref["val_loss"]})
    return rows
