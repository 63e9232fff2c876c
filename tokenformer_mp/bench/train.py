"""Training-step speed, MFU and communication per parallel layout, on random tokens (speed ignores content)."""
from __future__ import annotations

import statistics
import tempfile

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..config import load_config
from ..model import Block, count_params, flops_per_token
from ..parallel.local import run_ranks
from ..trainer import Trainer
from .comm import count_collectives, rank_bytes_per_step
from .synthetic import FixedVocab, RandomTokens


def _rank_run(config: str, overrides: dict) -> dict:
    cfg = load_config(config, {**overrides, "train.eval_interval": 0, "checkpoint.save_interval": 0})
    t = cfg.train
    vocab = cfg.model.vocab_size or 4096
    n = 64 * t.steps * (t.global_batch_size or t.micro_batch_size * (t.grad_accum_steps or 1))  # enough at any DP
    trainer = Trainer(cfg, datasets=(RandomTokens(n, cfg.model.seq_length, vocab), None), tokenizer=FixedVocab(vocab))
    trainer.save = lambda: None  # measuring steps, not checkpoints
    trainer.fit()
    trainer.measure_peak()  # readings before and after the steps: the best of them is the device's peak
    with count_collectives() as counts:  # one more step, once the first step's one-off messages are behind
        trainer.train_step()
    tp_ranks = tuple(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()))
    cp_ranks = tuple(dist.get_process_group_ranks(ps.get_context_parallel_group()))
    tp_bytes = sum(v for (op, ranks), v in counts.items() if ranks == tp_ranks and len(ranks) > 1)
    cp_bytes = sum(v for (ranks, caller), v in counts.by_caller.items()  # K and V, not DeepSpeed's on the same group
                   if ranks == cp_ranks and len(ranks) > 1 and caller.startswith("tokenformer_mp."))
    analytic = rank_bytes_per_step(trainer.cfg, trainer.layout.dp, ps.get_pipeline_model_parallel_rank(),
                                   sum(isinstance(m, Block) for m in trainer.model.modules()),
                                   sum(p.numel() for p in trainer.model.parameters()), trainer.precision)
    out = {"history": trainer.history, "tp_bytes": tp_bytes, "cp_bytes": cp_bytes,
           "analytic": analytic, "cp_rank": ps.get_context_parallel_rank(),
           "all_bytes": sum(v for (op, ranks), v in counts.items() if len(ranks) > 1),
           "tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
           "flops_per_token": trainer.flops_per_token, "peak": trainer.matmul_peak.summary(),
           "datasheet_peak": trainer.datasheet_peak,
           "peak_memory_gb": torch.cuda.max_memory_allocated(trainer.device) / 1e9
           if trainer.device.type == "cuda" else None}
    dist.barrier()
    dist.destroy_process_group()
    ps.destroy_model_parallel()
    return out


def _mfu(tokens_per_s: float, results: list[dict]) -> dict:
    """MFU of the median step against every rank's best matmul reading (and the datasheet's bf16 peak where known);
    `mfu_suspect` flags an MFU above 1, which only a peak that read low can give."""
    r = results[0]
    peak = max(x["peak"]["matmul_peak_flops"] for x in results)
    flops = tokens_per_s * r["flops_per_token"] / len(results)
    out = {"mfu": flops / peak, **r["peak"], "matmul_peak_flops": peak}
    out["mfu_suspect"] = out["mfu"] > 1
    if r["datasheet_peak"]:
        out["mfu_datasheet"] = flops / r["datasheet_peak"]
    return out


def measure(config: str, overrides: dict, world: int = 1, warmup: int = 2) -> dict:
    """Median step time and tokens/s after warm-up steps; bytes per step, every rank's counted against its analytic
    count (comm.rank_bytes_per_step): the TP group's and the CP group's (K and V) summed over one rank per
    pipeline stage, and all of them."""
    with tempfile.TemporaryDirectory() as run_dir:  # not the config's run_dir: no resuming from a user's checkpoints
        results = run_ranks(world, _rank_run, config, {**overrides, "run_dir": run_dir})
    cfg = load_config(config, overrides)
    hist = results[0]["history"][warmup:]
    p = cfg.parallel
    # one rank per pipeline stage: its TP group's and its CP group's collectives
    one_per_stage = [r for r in results if r["tp_rank"] == 0 and r["cp_rank"] == 0 and r["dp_rank"] == 0]
    counted = [r["all_bytes"] for r in results]
    modelled = results[0]["analytic"] is not None
    analytic = [sum(r["analytic"].values()) for r in results] if modelled else None
    sp = " sp" if p.sequence_parallel and p.tp > 1 else ""
    cp = f" cp{p.cp}" if p.cp > 1 else ""
    return {"layout": f"tp{p.tp}{sp}{cp} pp{p.pp} dp{p.dp(world)}", "world": world,
            "step_time_s": statistics.median(h["step_time_s"] for h in hist),
            "tokens_per_s": statistics.median(h["tokens_per_s"] for h in hist),
            **_mfu(statistics.median(h["tokens_per_s"] for h in hist), results),
            "peak_memory_gb": max((r["peak_memory_gb"] or 0) for r in results) or None,
            "tp_bytes_per_step": sum(r["tp_bytes"] for r in one_per_stage),
            "tp_bytes_analytic": sum(r["analytic"]["tp"] for r in one_per_stage) if modelled else None,
            "cp_bytes_per_step": sum(r["cp_bytes"] for r in one_per_stage),
            "cp_bytes_analytic": sum(r["analytic"]["cp"] for r in one_per_stage) if modelled else None,
            "bytes_per_step": sum(counted), "bytes_analytic": sum(analytic) if modelled else None,
            "bytes_match_every_rank": counted == analytic if modelled else None}


def compare_archs(tokenformer: tuple[str, dict], transformer: tuple[str, dict], rounds: int = 2) -> dict:
    """A TokenFormer's training step against a Transformer's of as many parameters on as many tokens per step, each
    (config, overrides) measured `rounds` times, alternating; each arch's best median step counts (another process
    only ever slows a run). Beside each time, the analytic training FLOPs of a step (Table 3's count, attention
    causal: MFU's numerator), which equal parameters make the same for both."""
    runs = {"tokenformer": [], "transformer": []}
    for _ in range(rounds):
        for arch, (config, overrides) in (("tokenformer", tokenformer), ("transformer", transformer)):
            runs[arch].append(measure(config, overrides))
    row = {}
    for arch, (config, overrides) in (("tokenformer", tokenformer), ("transformer", transformer)):
        cfg = load_config(config, overrides)
        if cfg.model.arch != arch:
            raise ValueError(f"{config}: model.arch {cfg.model.arch}, not {arch}")
        best = min(runs[arch], key=lambda r: r["step_time_s"])
        tokens = cfg.train.global_batch(1) * cfg.model.seq_length  # one process
        tag = {"tokenformer": "tf", "transformer": "tr"}[arch]  # the columns side by side
        row.update({f"{tag}_params": count_params(cfg.model)["params"], f"{tag}_tokens_per_step": tokens,
                    f"{tag}_gflop_per_step": flops_per_token(cfg.model, causal=True) * tokens / 1e9,
                    f"{tag}_step_s": best["step_time_s"], f"{tag}_mfu": best["mfu"]})
    for key in ("params", "tokens_per_step"):
        if row[f"tf_{key}"] != row[f"tr_{key}"]:
            raise ValueError(f"not a like-for-like comparison: {key} {row[f'tf_{key}']} vs {row[f'tr_{key}']}")
    row["ratio"] = row["tf_step_s"] / row["tr_step_s"]
    return row
