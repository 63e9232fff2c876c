"""The trainer: one code path for every layout (one CPU process, one GPU, or TP x PP x CP x DP ranks under any
launcher). DeepSpeed is the engine (ZeRO, mixed precision, the pipeline schedule); megatron-core supplies the process
groups and the datasets; checkpoints are the layout-free format (tokenformer_mp.engine_checkpoint).

Imported only after a config has been checked (tokenformer_mp.train): DeepSpeed and megatron-core take seconds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state as ps
from tqdm import tqdm

from .checkpoint import TAG, candidates, has_checkpoints, read_json
from .config import GROWTH_STAGE_KEYS, Config, ConfigError, TrainConfig, load_config, pad_vocab, to_yaml, validate
from .data.batches import Batches, Packing, forward_args
from .data.datasets import build_cache, build_datasets, cache_dir_of, sample_counts, wait_for_cache
from .engine_checkpoint import Live, Saver, canonical_params, load_checkpoint
from .fileio import write_atomic
from .flops import MatmulPeak, datasheet_bf16_peak, format_mfu, measure_matmul_flops
from .metrics import MetricsWriter
from .model import Pattention, flops_per_token, pattention_kind
from .optim import RowRule, RowRules, zero_leading_rows_grad
from .parallel import groups
from .parallel.build import apply_compile, build_model, build_pipeline
from .parallel.context_parallel import chunk_index
from .parallel.launch import discover, init_distributed, pick_device
from .plot import plot_loss
from .spike_guard import SpikeGuard
from .straggler import StragglerReport
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


@dataclass
class Schedule:
    """Linear warmup, then cosine from lr to min_lr at step `steps`, then min_lr."""
    lr: float
    min_lr: float
    warmup_steps: int
    steps: int

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def schedule_of(t: TrainConfig, growth: dict | None = None, source: str = "") -> Schedule:
    """train.*, with the new stage's values of a grown checkpoint's recipe (its manifest's `growth`) in their place
    where the recipe sets them."""
    stage = {k: (growth or {}).get(k) for k in GROWTH_STAGE_KEYS}
    s = Schedule(**{k: getattr(t, k) if v is None else v for k, v in stage.items()})
    if s.min_lr > s.lr:
        keys = " and ".join(f"{'growth' if stage[k] is not None else 'train'}.{k}" for k in ("min_lr", "lr"))
        raise ConfigError(f"{keys}: the stage would decay from {s.lr:g} up to {s.min_lr:g} ({source} was grown with "
                          f"{', '.join(f'{k} {v}' for k, v in stage.items() if v is not None)}): set train.min_lr "
                          f"to at most {s.lr:g}")
    return s


def check_recipe(cfg: Config, growth: dict | None, source: str | None) -> str | None:
    """A config whose growth section says anything must say what the checkpoint was grown with: a stage trained
    under another recipe than its lineage records would be mislabelled. One that says nothing takes the record.
    Returns a note for the log where the section has nothing to apply to."""
    if not cfg.growth.is_set():
        return None
    if growth is None:
        return (f"growth.* in the config are not applied: {source or 'no checkpoint (checkpoint.load)'} was not "
                f"grown with a recorded recipe")
    mine = cfg.growth.resolved(cfg.model)
    for key, recorded in growth.items():
        if mine.get(key) != recorded:
            raise ConfigError(f"growth.{key}: {mine.get(key)} in the config, but {source} was grown with "
                              f"{recorded} (its recipe: {json.dumps(growth)}): set growth.{key} {recorded}, or "
                              f"leave the config's growth section out to take the checkpoint's")
    return None


class Trainer:
    def __init__(self, cfg: Config, datasets=None, tokenizer=None):
        """datasets/tokenizer: given ones replace those named by cfg.data (tests, notebooks)."""
        self.cfg = cfg
        validate(cfg, check_paths=datasets is None, check_env=True)  # before any process group or allocation
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
        self.layout = groups.layout()
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
        self._build_engine()
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
        self.growth = None  # the recipe the loaded checkpoint was grown with, carried into new saves
        self.saver = Saver(self.live, self.ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.row_rules = None  # installed at the first step, once a checkpoint (and its grown_from) is loaded
        # a step of PP > 1 runs whole inside DeepSpeed's pipeline schedule: no point to time a rank's own work at
        self.stragglers = StragglerReport(self.run_dir, self.device, lay.rank, lay.world, t.log_interval,
                                          t.straggler_threshold, has_ready_point=lay.pp == 1)
        self.guard = SpikeGuard(t.spike_loss_factor, t.spike_grad_norm_factor, t.spike_window, t.spike_max_skips,
                                t.spike_max_rollbacks)
        self._step_loss, self._verdict, self._saved_lr = None, None, []  # the step being judged (spike guard)
        self.skip_file = os.path.join(self.run_dir, "skipped_samples.json")

    # --- engine -----------------------------------------------------------------------------------------------
    def _build_engine(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        cp_group = groups.cp_group() if self.layout.cp > 1 else None
        if self.layout.pp > 1:
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
        self.schedule = schedule_of(t)  # a grown checkpoint's recipe replaces it when loaded (maybe_resume)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.schedule.lr_at(s) / t.lr)
        self.adamw = optimizer  # the torch optimizer DeepSpeed drives: row rules hook its step
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
            config=self.deepspeed_config(sum(p.numel() for p in model.parameters())))
        self.model = model
        self.live = Live(model, self.engine, self.layout, cfg.model)  # what checkpoints are taken from

    def deepspeed_config(self, rank_params: int) -> dict:
        """The engine's config (a method, so a measurement can compare DeepSpeed's own settings: bench.precision)."""
        return deepspeed_config(self.cfg, self.layout.dp, self.precision, rank_params)

    def _dp_mean(self, value: float) -> float:
        """The mean over DP x CP (a CP rank's loss is its token-weighted share times CP: parallel.context_parallel)."""
        n = self.layout.dp * self.layout.cp
        if n == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=groups.dp_cp_group())
        return t.item() / n

    # --- per-row optimizer rules: no decay for the final LayerNorm, old tokens' rate after growth ---------------
    def _install_row_rules(self) -> None:
        if self.row_rules is not None:
            return
        t, rules = self.cfg.train, []
        mult = t.old_tokens_lr_mult
        if mult != 1.0 and not self.grown_from:
            raise ConfigError(f"train.old_tokens_lr_mult={mult} treats the parameter tokens a checkpoint had before "
                              f"growth, but {self.loaded_from or 'no checkpoint (checkpoint.load)'} has no growth "
                              f"record (grown_from): grow one with tools/reshard_checkpoint.py --expand-*")
        for name, p in canonical_params(self.live):
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
        # after the row rules' hooks: a skipped step's rate is 0 when they run, so they change nothing either
        self.adamw.register_step_pre_hook(self._skip_if_spike)
        self.adamw.register_step_post_hook(self._restore_lr)

    @torch.no_grad()
    def _skip_if_spike(self, optimizer, args, kwargs) -> None:
        """Inside DeepSpeed's step, after the global grad norm and before any update: a spike (SpikeGuard) steps no
        parameter, and its rate is 0 for the row rules. Judged once a step (ZeRO may step its groups in turn)."""
        if self._verdict is None:
            norm = float(self.engine.optimizer._global_grad_norm)  # ZeRO's and the bf16 optimizer's, unclipped
            self._verdict = self.guard.judge(self._step_loss, norm) or ""
        if self._verdict:
            for group in optimizer.param_groups:
                self._saved_lr.append((group, group["lr"]))
                group["lr"] = 0.0
                for p in group["params"]:
                    p.grad = None  # torch's optimizers pass over a parameter without a gradient: no moment, no step

    def _restore_lr(self, optimizer, args, kwargs) -> None:
        for group, lr in self._saved_lr:
            group["lr"] = lr
        self._saved_lr = []

    def train_step(self) -> tuple[float, float]:
        """One optimizer step (all micro-batches); returns (global mean loss, global grad norm)."""
        batches = self.train_batches.micro_batches(self.step)
        self.engine.train()
        self._install_row_rules()
        self._step_loss, self._verdict = None, None
        if self.layout.pp > 1:
            loss = self.engine.train_batch(data_iter=iter(batches)).item()
        else:
            total = None  # summed on the device: one host sync per step, not one per micro-batch
            for i, (inputs, (labels, mask)) in enumerate(batches):
                out = self.engine(*forward_args(inputs, labels, mask))
                total = out.detach().double() if total is None else total + out.detach().double()
                last = i == self.train_batches.accum - 1
                if last:  # the last backward starts the gradient reduction
                    self.stragglers.ready()
                self.engine.backward(out)
                if last:  # known before the step, which the spike guard judges
                    self._step_loss = self._dp_mean(total.item() / self.train_batches.accum)
                self.engine.step()
            loss = self._step_loss
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
        self.saver.save(self.step, self.run_record())

    def run_record(self) -> dict:
        """What a checkpoint's manifest records of the run besides its tensors."""
        return {"config": self.cfg.to_dict(), "tokens_seen": self.step * self.tokens_per_step,
                "grown_from": self.grown_from, "growth": self.growth, "history": self.lineage,
                **({"skipped_samples": [list(r) for r in self.train_batches.skipped]} if self.train_batches.skipped
                   else {})}

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
        manifest = load_checkpoint(self.live, src).manifest if src is not None else {}
        note = check_recipe(self.cfg, manifest.get("growth"), src)
        if note and self.is_logger:
            log.warning(note)
        # the samples rollbacks skipped: this run's record (kept across a kill right after a rollback) and what the
        # checkpoint carries (a run started from another run's checkpoint)
        skipped = read_json(self.skip_file, "the spike guard's skipped samples")["ranges"] \
            if os.path.exists(self.skip_file) else []
        skipped += [r for r in manifest.get("skipped_samples", []) if r not in skipped]
        if skipped:
            self.train_batches.skip(skipped)
            if self.is_logger:
                log.info("samples %s are skipped (spike guard rollbacks, %s)", skipped, self.skip_file)
        if src is not None:
            self.loaded_from, self.grown_from = src, manifest.get("grown_from")
            self.lineage, self.growth = manifest.get("history", []), manifest.get("growth")
            self.schedule = schedule_of(self.cfg.train, self.growth, src)
            self._go_to(manifest["step"])
            if self.is_logger:
                log.info("resumed from %s at step %d", src, self.step)
                if self.growth is not None:
                    log.info("grown with recipe %s; the stage's schedule: %s", json.dumps(self.growth), self.schedule)

    def _record_spike(self, rec: dict, reason: str, bar) -> None:
        """A spike's step, loss, grad norm and samples into its record (metrics.jsonl), RUN/spikes.jsonl and the log."""
        first = self.train_batches.start_of(self.step - 1)
        rec["spike"], rec["samples"] = reason, [first, first + self.train_batches.global_batch]
        if self.is_logger:
            with open(os.path.join(self.run_dir, "spikes.jsonl"), "a") as f:
                f.write(json.dumps({k: rec[k] for k in ("step", "loss", "grad_norm", "spike", "samples")}) + "\n")
            what = "applied: PP > 1 knows the loss after the step" if reason.endswith("(applied)") else "not applied"
            bar.write(f"step {self.step}: spike ({reason.split()[0]}): loss {rec['loss']:.4f}, grad norm "
                      f"{rec['grad_norm']:.3f}, samples [{rec['samples'][0]}, {rec['samples'][1]}): {what}")

    def _go_to(self, step: int) -> None:
        """The step a loaded checkpoint was saved at, and its learning rate."""
        self.step = self.scheduler.last_epoch = step
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _roll_back(self, why: str, consumed: int, bar) -> None:
        """The spike guard's rollback (every rank reaches it at the same step): reload the newest complete checkpoint
        and skip the samples from its step to the `consumed` steps whose data has been read."""
        g = self.guard
        src = self.ckpt_dir if has_checkpoints(self.ckpt_dir) else self.cfg.checkpoint.load
        if src is None or g.rollbacks >= g.max_rollbacks:
            reason = "no checkpoint to roll back to" if src is None else \
                f"{g.rollbacks} rollback(s) already (train.spike_max_rollbacks {g.max_rollbacks})"
            raise TrainingDiverged(f"{why}; {reason}: stopping. {self._what_is_kept()}")
        self.saver.finish()
        loaded = load_checkpoint(self.live, src)
        back_to = loaded.manifest["step"]
        skip = [self.train_batches.start_of(back_to), self.train_batches.start_of(consumed)]
        ranges = [list(r) for r in self.train_batches.skipped] + [skip]
        self.train_batches.skip(ranges)
        self._go_to(back_to)
        g.rolled_back()
        bar.n = back_to
        if self.is_logger:
            write_atomic(self.skip_file, json.dumps({"ranges": ranges}))
            event = {"event": "rollback", "why": why, "to_step": back_to, "checkpoint": loaded.path,
                     "skipped_samples": skip, "rollback": g.rollbacks}
            with open(os.path.join(self.run_dir, "spikes.jsonl"), "a") as f:
                f.write(json.dumps(event) + "\n")
            bar.write(f"{why}: rolled back to step {back_to} ({loaded.path}), samples [{skip[0]}, {skip[1]}) "
                      f"skipped (rollback {g.rollbacks} of at most {g.max_rollbacks})")

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
            self.stragglers.begin(self.step + 1, start)
            loss, norm = self.train_step()
            elapsed, input_wait = time.perf_counter() - start, self.train_batches.wait_s - waited
            pace = self.stragglers.gather(self.step + 1, elapsed, input_wait)
            self.watchdog.disarm(finished=True)
            # Only fp16's dynamic loss scale skips a step by design (overflow: scale lowered, step retried). DeepSpeed's
            # ZeRO counts a skip for an infinite grad norm in fp32 and bf16 too: there it is divergence.
            skipped = self.precision == "fp16" and getattr(self.engine, "skipped_steps", 0) > skipped_before
            if not math.isfinite(loss) or (not math.isfinite(norm) and not skipped):  # DeepSpeed did not apply it
                self._roll_back(f"step {self.step + 1}: loss {loss}, grad norm {norm} is not finite",
                                self.step + 1, bar)
                waited = self.train_batches.wait_s
                continue
            # a spike, not applied (judged inside the step); at PP > 1 a loss spike is known only now, applied
            spike = self._verdict or (self.layout.pp > 1 and self.guard.judge(loss, None) and "loss (applied)")
            self.step += 1
            tps = self.tokens_per_step / elapsed
            rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps,
                   **self.mfu(tps), "step_time_s": elapsed, "input_wait_s": input_wait,
                   "tokens_seen": self.step * self.tokens_per_step, **pace}
            if skipped:
                rec["skipped"] = True
                bar.write(f"step {self.step}: fp16 overflow, step skipped, loss scale lowered")
            if spike:
                self._record_spike(rec, spike, bar)
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
                if rec.get("straggler"):
                    line += (f" | straggler: rank {rec['slowest_rank']} ({rec['slowest_host']}) "
                             f"{rec['slowest_lag_s']:.2f} s behind")
                bar.write(line)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)  # redraws follow mininterval (TQDM_MININTERVAL in logs)
            self.guard.record(self.step, loss, norm, spike=bool(spike))
            if self.guard.must_roll_back():
                self._roll_back(f"step {self.step}: {len(self.guard.spikes)} spikes within train.spike_window "
                                f"{t.spike_window} steps", self.step, bar)
                waited = self.train_batches.wait_s
                continue
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
            plot_loss(self.run_dir)
        return last


def train_history(config: str, overrides: dict, datasets=None, tokenizer=None) -> list[dict]:
    """Train in this process (one rank of a launched world, or alone) and return every step's record."""
    trainer = Trainer(load_config(config, overrides), datasets=datasets, tokenizer=tokenizer)
    trainer.fit()
    shutdown()
    return trainer.history


def evaluate_checkpoint(config: str, overrides: dict) -> float:
    """The validation loss of the checkpoint that checkpoint.load names, built at the config's layout, before any step
    (train_history evaluates only after steps): a grown model's, to compare with its source's last."""
    trainer = Trainer(load_config(config, overrides))
    trainer.maybe_resume()
    loss = trainer.evaluate()
    shutdown()
    return loss


def shutdown() -> None:
    """Leave no process group behind (several trainers may run one after another in a process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    ps.destroy_model_parallel()
