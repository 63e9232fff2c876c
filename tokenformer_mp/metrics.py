"""A training run's metrics: every step's record to metrics.jsonl and, when asked, TensorBoard and Weights & Biases."""
from __future__ import annotations

import json
import os

from .config import Config, to_yaml
from .fileio import write_atomic


class MetricsWriter:
    """Every step's record to metrics.jsonl, TensorBoard (logging.tensorboard) and Weights & Biases
    (logging.wandb_project), with the run's config beside them; written by global rank 0 only."""

    def __init__(self, cfg: Config, enabled: bool):
        run_dir, log_cfg = cfg.run_dir, cfg.logging
        self.enabled, self.path, self.tb, self.wandb = enabled, os.path.join(run_dir, "metrics.jsonl"), None, None
        if not enabled:
            return
        # Imported here: rank 0 only, and only when asked (TensorBoard 0.2 s, wandb 0.4 s of every start-up).
        if log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            self.tb.add_text("config", "```\n" + to_yaml(cfg) + "```")
        if log_cfg.wandb_project:
            import wandb
            # one W&B run per run directory: a requeued job continues it instead of starting another
            id_file = os.path.join(run_dir, "wandb_run_id")
            if not os.path.exists(id_file):
                write_atomic(id_file, os.urandom(8).hex())
            with open(id_file) as f:
                run_id = f.read().strip()
            self.wandb = wandb.init(project=log_cfg.wandb_project, mode=log_cfg.wandb_mode, dir=run_dir, id=run_id,
                                    resume="allow", name=os.path.basename(os.path.abspath(run_dir)),
                                    config=cfg.to_dict())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()  # on disk at every step, not every two minutes: a crash loses nothing
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None
