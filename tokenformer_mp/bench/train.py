"""Training-step speed, MFU and communication per parallel layout, on random tokens (speed ignores content)."""
from __future__ import annotations

import statistics

from ..config import load_config
from ..parallel.local import run_ranks


def _rank_run(config: str, overrides: dict, count_comm: bool) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ..train import Trainer
    from .comm import count_collectives
    from .synthetic import FixedVocab, RandomTokens

    cfg = load_config(config, {**overrides, "train.eval_interval": 0, "checkpoint.save_interval": 0})
    t = cfg.train
    vocab = cfg.model.vocab_size or 4096
    n = t.steps * t.micro_batch_size * t.grad_accum_steps * 64
    trainer = Trainer(cfg, datasets=(RandomTokens(n, cfg.model.seq_length, vocab), None), tokenizer=FixedVocab(vocab))
    trainer.save = lambda: None  # measuring steps, not checkpoints
    with count_collectives() as counts:
        trainer.fit()
    tp_ranks = tuple(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()))
    tp_bytes = sum(v for (op, ranks), v in counts.items() if ranks == tp_ranks and len(ranks) > 1)
    out = {"history": trainer.history, "tp_bytes": tp_bytes, "all_bytes": sum(counts.values()),
           "tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
           "flops_per_token": trainer.flops_per_token, "peak_flops": trainer.peak_flops}
    dist.barrier()
    dist.destroy_process_group()
    ps.destroy_model_parallel()
    return out


def measure(config: str, overrides: dict, world: int = 1, warmup: int = 2) -> dict:
    """Median step time and tokens/s after warm-up steps; TP bytes per step against the analytic count."""
    from ..parallel.tensor_parallel import tp_bytes_per_step

    results = run_ranks(world, _rank_run, config, overrides, True)
    cfg = load_config(config, overrides)
    hist = results[0]["history"][warmup:]
    steps = len(results[0]["history"])
    m, t, p = cfg.model, cfg.train, cfg.parallel
    measured = sum(r["tp_bytes"] for r in results if r["tp_rank"] == 0 and r["dp_rank"] == 0) / steps
    analytic = tp_bytes_per_step(m.num_layers, m.hidden_size, t.micro_batch_size * m.seq_length,
                                 t.grad_accum_steps, p.tp, sequence_parallel=p.sequence_parallel)
    sp = " sp" if p.sequence_parallel and p.tp > 1 else ""
    return {"layout": f"tp{p.tp}{sp} pp{p.pp} dp{world // (p.tp * p.pp)}", "world": world,
            "step_time_s": statistics.median(h["step_time_s"] for h in hist),
            "tokens_per_s": statistics.median(h["tokens_per_s"] for h in hist),
            "mfu": statistics.median(h["mfu"] for h in hist), "matmul_peak_flops": results[0]["peak_flops"],
            "tp_bytes_per_step": measured, "tp_bytes_analytic": analytic,
            "all_bytes_per_step_rank0": results[0]["all_bytes"] / steps}
