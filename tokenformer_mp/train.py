"""python -m tokenformer_mp.train --config FILE [--run-dir DIR] [--section.key VALUE ...]

One code path for every layout: one CPU process, one GPU, or TP x PP x DP ranks under any launcher. DeepSpeed is the
engine (ZeRO, mixed precision, pipeline schedule, checkpoints); megatron-core supplies process groups and data.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .checkpoint import (TAG, CheckpointError, Saver, candidates, canonical_params, has_checkpoints, load_checkpoint,
                         write_atomic)
from .config import Config, ConfigError, load_config, pad_vocab, parse_overrides, to_yaml, validate
from .data.batches import Batches, Packing, forward_args
from .flops import MatmulPeak, datasheet_bf16_peak, format_mfu, measure_matmul_flops
from .model import Pattention, flops_per_token
from .tokenizer import build_tokenizer
from .watchdog import HangWatchdog

log = logging.getLogger("tokenformer_mp")


class TrainingDiverged(RuntimeError):
    pass


def resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.train.precision
    return ("bf16" if device.type == "cuda" else "fp32") if p == "auto" else p


def deepspeed_config(cfg: Config, dp: int, precision: str, rank_params: int | None = None) -> dict:
    """rank_params: this rank's parameter count, which bounds ZeRO's gradient bucket (below)."""
    t, p = cfg.train, cfg.parallel
    accum = t.accum_steps(dp)
    # DeepSpeed's data-parallel world is DP x CP (parallel.groups): a CP group's ranks each hold every sequence of
    # their DP rank's micro-batches, so DeepSpeed's batch counts each sequence CP times.
    dp *= p.cp
    bucket = p.grad_bucket_size or (40_000_000 if p.overlap_grad_reduce else 500_000_000)  # DeepSpeed's: 5e8
    # ZeRO allocates its gradient bucket at full size at every backward (twice when overlapping) and frees it after
    # the step, whatever the model's size: memory the allocator must find next to the activations, and on a CPU a
    # fresh mapping whose touched pages fault in again every step (1,025 faults a step for the debug model at the
    # default 5e8; none at its size). More than this rank's parameters would hold nothing more.
    zero = {"stage": p.zero_stage, "overlap_comm": p.overlap_grad_reduce,
            "reduce_bucket_size": min(bucket, rank_params or bucket)}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * dp,
        "gradient_clipping": t.clip_grad,
        # ZeRO-1 even at DP=1: with TP/PP it is the stage whose global grad norm is right (docs/design.md).
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        # bf16 as Megatron and torchtitan train it: gradients accumulated over the micro-batches and reduced across
        # data-parallel ranks in fp32 (DeepSpeed's BF16_Optimizer at ZeRO-1, fp32 partition buffers at ZeRO-2), not
        # summed in bf16; parallel.grad_reduce_dtype bf16 halves the reduction's bytes.
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": p.grad_reduce_dtype}
           if precision == "bf16" else {}),
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Between stages DeepSpeed sends each TP rank 1/TP of an activation it assumes the same on all of them, and
        # gathers it back; under sequence parallelism every rank holds its own slice already, which that would mix.
        "pipeline": {"pipe_partitioned": not cfg.parallel.sequence_parallel,
                     "grad_partitioned": not cfg.parallel.sequence_parallel},
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """One optimizer group, decayed; the final LayerNorm's exemption is a row rule (tokenformer_mp.optim), because a
    separate no-decay group would exist on the last pipeline stage only (block norms are non-parametric), and
    DeepSpeed's ZeRO all-reduces the grad norm once per group across stages: unequal group counts deadlock."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine from lr to min_lr at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    dp_rank: int
    rank: int
    world: int
    cp: int = 1  # context parallelism: every rank of a CP group reads the same samples (dp_rank), its own chunks
    cp_rank: int = 0


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


class Trainer:
    def __init__(self, cfg: Config, datasets=None, tokenizer=None):
        """datasets/tokenizer: given ones replace those named by cfg.data (tests, notebooks)."""
        self.cfg = cfg
        validate(cfg, check_paths=datasets is None, check_env=True)  # before any process group or allocation
        # megatron-core and DeepSpeed: seconds of imports, after a bad config was refused
        from .data.datasets import build_cache, build_datasets, cache_dir_of, sample_counts, wait_for_cache
        from .parallel import groups
        from .parallel.context_parallel import chunk_index
        from .parallel.launch import discover, init_distributed, pick_device

        le = discover()
        validate(cfg, check_paths=False, world_size=le.world_size)
        if tokenizer is None:
            tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        if datasets is None:  # megatron's index cache before any process group: its build has no collective timeout
            dp = cfg.parallel.dp(le.world_size)
            if le.rank == 0:
                build_cache(cfg, dp, tokenizer)
            else:
                wait_for_cache(cfg, dp)
        self.device = pick_device(cfg.train.device, le.local_rank)
        init_distributed(le, self.device, cfg.parallel.timeout_s)
        tp, pp, cp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp
        groups.initialize(tp, pp, cfg.parallel.timeout_s, cp)
        sizes = groups.sizes()
        self.layout = Layout(tp, pp, sizes["dp"], groups.ps.get_data_parallel_rank(), le.rank, le.world_size, cp,
                             groups.ps.get_context_parallel_rank())
        self.is_logger = le.rank == 0

        self.tokenizer = tokenizer
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = pad_vocab(self.tokenizer.vocab_size, cfg.model.pad_vocab_multiple)
        validate(cfg, check_paths=False, tokenizer_vocab=self.tokenizer.vocab_size, world_size=le.world_size)

        self.precision = resolve_precision(cfg, self.device)
        self.run_dir = cfg.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if self.is_logger:
            os.makedirs(self.run_dir, exist_ok=True)
            write_atomic(os.path.join(self.run_dir, "config.yaml"), to_yaml(cfg))
        self._build_engine(groups)
        # DeepSpeed's pipeline reads micro-batches on its first and last stages only: the others wait for none
        self.reads_input = self.layout.pp == 1 or self.engine.is_first_stage() or \
            self.engine.is_last_stage()

        t = cfg.train
        G, accum = t.global_batch(self.layout.dp), t.accum_steps(self.layout.dp)
        source = "the given dataset"
        if datasets is None:  # the cache is built: every rank loads it
            source = f"data.prefixes {', '.join(cfg.data.prefixes)} (index cache {cache_dir_of(cfg)})"
            datasets = build_datasets(cfg.data.prefixes, cfg.data.weights, cfg.data.split, cfg.model.seq_length,
                                      t.seed, sample_counts(cfg, self.layout.dp), self.tokenizer, cache_dir_of(cfg),
                                      cfg.data.reset_position_ids, cfg.data.eod_mask_loss)
        train_ds, valid_ds = datasets[0], datasets[1]
        lay, d = self.layout, cfg.data
        packing = Packing(positions=cfg.inputs_carry_positions(),
                          eod=self.tokenizer.eod if d.reset_attention_mask else None,
                          chunk=chunk_index(cfg.model.seq_length, lay.cp, lay.cp_rank) if lay.cp > 1 else None)
        self.train_batches = Batches(train_ds, lay.dp, lay.dp_rank, t.micro_batch_size, accum, self.device,
                                     prefetch=d.prefetch_steps, packing=packing, source=source)
        self.valid_batches = Batches(valid_ds, lay.dp, lay.dp_rank, t.micro_batch_size, accum, self.device,
                                     packing=packing) \
            if valid_ds is not None and len(valid_ds) > 0 else None
        self.tokens_per_step = G * cfg.model.seq_length
        self.flops_per_token = flops_per_token(cfg.model, causal=True)  # MFU's numerator
        self.matmul_peak = MatmulPeak()
        self.datasheet_peak = datasheet_bf16_peak(torch.cuda.get_device_name(self.device)) \
            if self.device.type == "cuda" and self.precision == "bf16" else None
        self.metrics = MetricsWriter(cfg, self.is_logger)
        self.step = 0
        self.history: list[dict] = []  # every step's record, on every rank (tests compare layouts with it)
        self._stop_signal = None
        self.loaded_from, self.grown_from = None, None  # grown_from: token counts per kind before the last growth
        self.lineage: list[dict] = []  # the loaded checkpoint's history (resharding, growth), carried into new saves
        self.bytes_read = 0  # by the last checkpoint load, this rank
        self.saver = Saver(self, self.ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.row_rules = None  # installed at the first step, once a checkpoint (and its grown_from) is loaded

    # --- engine -----------------------------------------------------------------------------------------------
    def _build_engine(self, groups) -> None:
        import deepspeed

        from .parallel.build import apply_compile, build_model, build_pipeline

        cfg, t = self.cfg, self.cfg.train
        cp_group = groups.cp_group() if self.layout.cp > 1 else None
        if self.layout.pp > 1:
            from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
            # its data axis is DP x CP, laid out as megatron's (cp faster than dp; asserted in groups)
            topo = PipeModelDataParallelTopology(num_pp=self.layout.pp, num_mp=self.layout.tp,
                                                 num_dp=self.layout.dp * self.layout.cp)
            model = build_pipeline(cfg.model, t.seed, groups.tp_group(), topo, t.activation_checkpointing,
                                   cfg.parallel.sequence_parallel, cp_group)
            mpu = None  # DeepSpeed builds its own grid from the topology (same rank layout, asserted in groups)
        else:
            model = build_model(cfg.model, t.seed, groups.tp_group() if self.layout.tp > 1 else None,
                                cfg.parallel.sequence_parallel, cp_group)
            model.activation_checkpointing = t.activation_checkpointing
            mpu = groups.MPU
        for sub in model.modules():
            if isinstance(sub, Pattention):
                sub.fused, sub.recompute = t.fused_pattention, t.recompute_pattention_gelu
        if t.compile:
            apply_compile(model)
        # fused: one pass over the (ZeRO-flat) fp32 state instead of eight, on CPU and GPU alike
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                      eps=t.adam_eps, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / t.lr)
        self.adamw = optimizer  # the torch optimizer DeepSpeed drives: row rules hook its step
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
            config=self.deepspeed_config(sum(p.numel() for p in model.parameters())))
        self.model = model

    def deepspeed_config(self, rank_params: int) -> dict:
        """The engine's config (a method, so a measurement can compare DeepSpeed's own settings: bench.precision)."""
        return deepspeed_config(self.cfg, self.layout.dp, self.precision, rank_params)

    def _dp_mean(self, value: float) -> float:
        """The mean over DP x CP (a CP rank's loss is its token-weighted share times CP: parallel.context_parallel)."""
        n = self.layout.dp * self.layout.cp
        if n == 1:
            return value
        from .parallel import groups
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=groups.dp_cp_group())
        return t.item() / n

    # --- per-row optimizer rules: no decay for the final LayerNorm, old tokens' rate after growth ---------------
    def _install_row_rules(self) -> None:
        from .optim import RowRule, RowRules, zero_leading_rows_grad
        from .model import pattention_kind

        if self.row_rules is not None:
            return
        t, rules = self.cfg.train, []
        mult = t.old_tokens_lr_mult
        if mult != 1.0 and not self.grown_from:
            raise ConfigError(f"train.old_tokens_lr_mult={mult} treats the parameter tokens a checkpoint had before "
                              f"growth, but {self.loaded_from or 'no checkpoint (checkpoint.load)'} has no growth "
                              f"record (grown_from): grow one with tools/reshard_checkpoint.py --expand-*")
        for name, p in canonical_params(self):
            if name.startswith("final_norm.") and t.weight_decay:
                rules.append(RowRule(p, p.shape[0], decay=False))
            kind = pattention_kind(name)
            if kind is not None and mult != 1.0:
                start = p.shard_range[0] if getattr(p, "shard_range", None) is not None else 0
                old_rows = max(0, min(self.grown_from[kind[0]] - start, p.shape[0]))  # a prefix of this shard
                rules.append(RowRule(p, old_rows, lr_mult=mult))
                if mult == 0.0 and old_rows:
                    zero_leading_rows_grad(p, old_rows)
        self.row_rules = RowRules(self.adamw, rules)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step (all micro-batches); returns (global mean loss, global grad norm)."""
        batches = self.train_batches.micro_batches(self.step)
        self.engine.train()
        self._install_row_rules()
        if self.layout.pp > 1:
            loss = self.engine.train_batch(data_iter=iter(batches)).item()
        else:
            total = None  # summed on the device: one host sync per step, not one per micro-batch
            for inputs, (labels, mask) in batches:
                out = self.engine(*forward_args(inputs, labels, mask))
                total = out.detach().double() if total is None else total + out.detach().double()
                self.engine.backward(out)
                self.engine.step()
            loss = self._dp_mean(total.item() / self.train_batches.accum)
        norm = self.engine.get_global_grad_norm()
        return loss, float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_batches is None or self.cfg.train.eval_iters == 0:
            return None
        self.engine.eval()
        losses = []
        for i in range(self.cfg.train.eval_iters):
            if self.layout.pp > 1:
                losses.append(self.engine.eval_batch(data_iter=iter(self.valid_batches.micro_batches(i))).item())
            else:
                ls = [self.engine(*forward_args(inputs, lab, m)).double()
                      for inputs, (lab, m) in self.valid_batches.micro_batches(i)]
                losses.append(self._dp_mean(torch.stack(ls).sum().item() / len(ls)))
        return sum(losses) / len(losses)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save(self) -> None:
        """A checkpoint of this step, unless any rank holds a non-finite parameter or optimizer state: that is never
        saved (nor made `latest`, nor allowed to prune a good checkpoint away)."""
        bad = self._ranks_with_nonfinite_state()
        if bad:
            raise TrainingDiverged(f"step {self.step}: non-finite parameters or optimizer state on rank(s) {bad}; "
                                   f"not saved. {self._what_is_kept()}")
        self.saver.save(self.step)

    def _what_is_kept(self) -> str:
        """For the divergence messages: the checkpoint a restart resumes from, as it is on disk now."""
        order, _ = candidates(self.ckpt_dir)
        if order:
            return (f"The last good checkpoint, {os.path.join(self.ckpt_dir, order[0])} (step "
                    f"{TAG.match(order[0]).group(1)}), is kept.")
        start = self.cfg.checkpoint.load
        return f"No checkpoint has been saved in {self.ckpt_dir}: a restart starts " + \
            (f"again from checkpoint.load {start}." if start else "from scratch.")

    def _ranks_with_nonfinite_state(self) -> list[int]:
        """Ranks whose parameters or optimizer state (the model's copy, ZeRO's fp32 partition and its Adam moments)
        hold a NaN or inf, agreed by all ranks: each holds other tensors (TP/PP shards, ZeRO partitions)."""
        base = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW over ZeRO's fp32 partitions
        held = list(self.model.parameters()) + [p for g in base.param_groups for p in g["params"]]
        held += [v for st in base.state.values() for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
        ok = torch.stack([torch.isfinite(t).all() for t in held]).all().to(torch.int64).reshape(1)
        flags = [torch.empty_like(ok) for _ in range(self.layout.world)] if self.layout.world > 1 else [ok]
        if self.layout.world > 1:
            dist.all_gather(flags, ok)
        return [r for r, f in enumerate(flags) if not f.item()]

    def maybe_resume(self) -> None:
        """The run directory's own latest checkpoint, else checkpoint.load, else nothing. checkpoint.load is where a
        run starts (a grown or resharded checkpoint), so the same command, requeued after preemption, continues from
        the run's own progress instead of starting over from it (torchtitan's initial_load_path, Megatron's
        --pretrained-checkpoint)."""
        own = self.ckpt_dir if has_checkpoints(self.ckpt_dir) else None
        src = own or self.cfg.checkpoint.load
        if own and self.cfg.checkpoint.load and self.is_logger:
            log.info("checkpoint.load %s is where the run started; it continues from its own checkpoints in %s",
                     self.cfg.checkpoint.load, self.ckpt_dir)
        if src is not None:
            manifest = load_checkpoint(self, src)
            self.step = manifest["step"]
            self.loaded_from, self.grown_from = src, manifest.get("grown_from")
            self.lineage = manifest.get("history", [])
            self.scheduler.last_epoch = self.step
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.cfg)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            if self.is_logger:
                log.info("resumed from %s at step %d", src, self.step)

    # --- loop -------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signum  # checkpoint at the next step boundary, then exit (Slurm requeues)

    def _step_boundary(self, next_input: bool) -> bool:
        """Whether any rank got a stop signal, agreed by all ranks at this step boundary; with it, whether every
        rank has finished writing a background checkpoint, which is then finalized here.

        Slurm signals every task, but each rank reaches the boundary at its own moment (pipeline stages are skewed):
        deciding alone, one rank could enter save() (collectives) while another starts the next step, and hang.
        next_input: first wait for the next step's input, or for a signal while waiting for it. A rank whose input
        does not come (a stuck read) thus still meets the others here on a signal, and the run checkpoints and stops
        instead of hanging inside the step; an error reading the input is raised here, before any collective."""
        if next_input and self.reads_input:
            self.train_batches.wait(self.step, lambda: self._stop_signal is not None)
        flags = [self._stop_signal or 0, int(not self.saver.local_done())]
        if self.layout.world > 1:
            t = torch.tensor(flags, dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()
        sig, writing = flags
        self.saver.poll(all_done=not writing)
        if sig and self._stop_signal is None:
            self._stop_signal = sig
        return sig != 0

    # --- MFU: model FLOPs (Table 3, attention causal) per second over the measured matmul peak (mfu) and the
    # datasheet's dense bf16 peak on known GPUs (mfu_datasheet) ------------------------------------------------------
    def measure_peak(self) -> None:
        """One more reading of the matmul peak, at a square shape that saturates the device and at the step's own
        largest matmul (a micro-batch's tokens x hidden x this rank's FFN width); the best reading counts."""
        m, t = self.cfg.model, self.cfg.train
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        own = (t.micro_batch_size * m.seq_length // self.layout.cp, m.hidden_size,
               max(1, m.ffn_width // self.layout.tp))
        self.matmul_peak.readings += [measure_matmul_flops(self.device, dtype, seconds=0.3),
                                      measure_matmul_flops(self.device, dtype, own, seconds=0.3)]

    def mfu(self, tokens_per_s: float) -> dict:
        flops = tokens_per_s * self.flops_per_token / self.layout.world  # per device
        out = {"mfu": flops / self.matmul_peak.best}
        if self.datasheet_peak is not None:
            out["mfu_datasheet"] = flops / self.datasheet_peak
        return out

    def _train_loop(self, bar) -> dict:
        """Steps until train.steps, a stop signal (checkpointed) or train.exit_after_steps; the last step's record."""
        t = self.cfg.train
        last, skipped_before, first_step, waited = {}, 0, self.step, self.train_batches.wait_s
        # agreed, as every stop: a signal that came before the first step's input did
        self.watchdog.arm(self.step + 1)
        stop = self.step < t.steps and self._step_boundary(next_input=True)
        self.watchdog.disarm()
        if stop and self.is_logger:
            bar.write(f"signal {self._stop_signal} while waiting for the input of step {self.step + 1}: nothing "
                      f"trained, exiting")
        while self.step < t.steps and not stop:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            # the step's time counts its wait for input, whether at the last boundary or in the step
            start = time.perf_counter() - (self.train_batches.wait_s - waited)
            self.watchdog.arm(self.step + 1)
            loss, norm = self.train_step()
            self.watchdog.disarm(finished=True)
            elapsed = time.perf_counter() - start
            # Only fp16's dynamic loss scale skips a step by design (overflow: scale lowered, step retried). DeepSpeed's
            # ZeRO counts a skip for an infinite grad norm in fp32 and bf16 too: there it is divergence.
            skipped = self.precision == "fp16" and getattr(self.engine, "skipped_steps", 0) > skipped_before
            if not math.isfinite(loss) or (not math.isfinite(norm) and not skipped):
                raise TrainingDiverged(f"step {self.step + 1}: loss {loss}, grad norm {norm} is not finite; stopping. "
                                       f"{self._what_is_kept()}")
            self.step += 1
            tps = self.tokens_per_step / elapsed
            rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps,
                   **self.mfu(tps), "step_time_s": elapsed, "input_wait_s": self.train_batches.wait_s - waited,
                   "tokens_seen": self.step * self.tokens_per_step}
            if skipped:
                rec["skipped"] = True
                bar.write(f"step {self.step}: fp16 overflow, step skipped, loss scale lowered")
            skipped_before = getattr(self.engine, "skipped_steps", 0)
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                val = self.evaluate()
                if val is not None:
                    rec["val_loss"], rec["val_ppl"] = val, math.exp(min(val, 50.0))
            self.metrics.write(rec)
            self.history.append(rec)
            if self.is_logger and (self.step % t.log_interval == 0 or "val_loss" in rec):
                line = (f"step {self.step:>6}/{t.steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {norm:.3f} | "
                        f"tok/s {tps:,.0f} | mfu vs measured matmul peak {format_mfu(rec['mfu'])}")
                if "mfu_datasheet" in rec:
                    line += f", vs datasheet bf16 peak {format_mfu(rec['mfu_datasheet'])}"
                if "val_loss" in rec:
                    line += f" | val_loss {rec['val_loss']:.4f} | val_ppl {rec['val_ppl']:.2f}"
                bar.write(line)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)  # redraws follow mininterval (TQDM_MININTERVAL in logs)
            last.update(rec)
            save_every = self.cfg.checkpoint.save_interval
            exiting = t.exit_after_steps and self.step - first_step >= t.exit_after_steps
            waited = self.train_batches.wait_s
            self.watchdog.arm(self.step)  # the boundary: the next step's input, then a collective
            stop = self._step_boundary(next_input=self.step < t.steps and not exiting)
            self.watchdog.disarm()
            if stop or exiting or (save_every and self.step % save_every == 0) or self.step == t.steps:
                self.save()
            if exiting:
                break
            if stop:
                if self.is_logger:
                    bar.write(f"signal {self._stop_signal}: checkpoint saved at step {self.step}, exiting")
                break
        return last

    def fit(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.maybe_resume()
        if self.step >= t.steps and self.is_logger:
            log.info("%s is complete (step %d of %d): nothing to train. A larger --train.steps continues it, another "
                     "--run-dir starts a new run.", self.run_dir, self.step, t.steps)
        self.measure_peak()
        self.watchdog = HangWatchdog(self.run_dir, self.layout.rank, self.layout.world, self.cfg.hang_timeout())
        self.model.register_forward_pre_hook(self.watchdog.forward_started)  # how far into a step a rank got
        # A bar on a terminal only: a log file (Slurm's, a pipe) gets the log lines alone, not a bar's redraws with
        # the lines written into them. Closed however the loop ends: an error then starts a line of its own.
        try:
            with tqdm(total=t.steps, initial=self.step, disable=not (self.is_logger and sys.stderr.isatty()),
                      desc="train", dynamic_ncols=True, mininterval=0.1) as bar:
                last = self._train_loop(bar)
            self.saver.finish()  # a checkpoint still being written in the background: complete, then `latest`
        finally:  # after an error too: no input thread or event writer left running into the interpreter's exit
            self.watchdog.close()
            self.train_batches.close()
            self.metrics.close()
        if self.is_logger and self.step == t.steps:
            from .plot import plot_loss
            plot_loss(self.run_dir)
        return last


def train_history(config: str, overrides: dict, datasets=None, tokenizer=None) -> list[dict]:
    """Train in this process (one rank of a launched world, or alone) and return every step's record."""
    trainer = Trainer(load_config(config, overrides), datasets=datasets, tokenizer=tokenizer)
    trainer.fit()
    shutdown()
    return trainer.history


def shutdown() -> None:
    """Leave no process group behind (several trainers may run one after another in a process)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    ps.destroy_model_parallel()


def quiet_libraries() -> None:
    """The libraries' INFO lines (megatron-core's some 30 index-cache lines, the compiler probes of DeepSpeed's op
    builders) off the console, the project's own and every warning kept. DeepSpeed's own logger does not propagate
    and sets its level when imported: a filter, which it keeps."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("tokenformer_mp").setLevel(logging.INFO)
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    ap.add_argument("--verbose", action="store_true",
                    help="the libraries' INFO lines too (megatron-core's dataset builder, DeepSpeed's engine)")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    if not args.verbose:
        quiet_libraries()
    try:
        overrides = parse_overrides(rest)
        if args.run_dir:
            overrides["run_dir"] = args.run_dir
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError) as e:  # LaunchError is a ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
    # found at load time (a bad checkpoint, or rules it cannot satisfy) or in training (input that cannot be read:
    # DataError, a ConfigError)
    except (ConfigError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():  # not left to the interpreter's exit (CI saw it abort once); no barrier: the
            dist.destroy_process_group()  # other ranks may have stopped elsewhere
        return 3 if isinstance(e, TrainingDiverged) else 2
    if trainer.is_logger and result:
        print(json.dumps({k: result[k] for k in ("step", "loss", "val_loss") if k in result}))
    stopped = trainer._stop_signal is not None and trainer.step < cfg.train.steps  # a late signal: done anyway
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 124 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
