"""Bad inputs, one table: every config key, file and tool argument a user can get wrong, with the message it gets.

Each case runs the real entry point (the trainer's main(), a tool's main()) and asserts exit 2 (3 for divergence), one
line `error: ...` naming the key or path, and that nothing was created or removed (no run directory, checkpoint,
output or scratch file; no process group). A new option is not done until it has its rows here.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.conftest import NEOX, REPO, debug_overrides
from tests.test_training import _args
from tokenformer_mp.checkpoint import read_latest, scan, write_layout_free
from tokenformer_mp.config import Config, ModelConfig
from tokenformer_mp.data.preprocess import scratch_prefix
from tokenformer_mp.model import TokenFormer

CKPT_MODEL = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=30, proj_tokens=18, ffn_tokens=70,
                         seq_length=32, vocab_size=1024)
TRANSFORMER_MODEL = dataclasses.replace(CKPT_MODEL, arch="transformer", ffn_hidden_size=70)
UNWRITABLE = "/sys/kernel"  # refuses new files even to root (sysfs); a read-only mount behaves the same


@dataclass
class Env:
    tmp: Path
    data: dict  # the corpus fixture: its text, indexed dataset and SentencePiece model
    run: Path  # the run directory a trainer case would create

    def train(self, run_dir: str | None = None, **overrides) -> list[str]:
        overrides = {"train.steps": 2, **overrides}  # were a case not refused, it would fail fast, not train on
        return ["--config", "configs/debug.yaml", *_args(debug_overrides(self.data, run_dir or self.run, **overrides))]

    def ckpt(self, corrupt: str | None = None, model: ModelConfig = CKPT_MODEL, name: str = "ckpt") -> str:
        """A small layout-free checkpoint (vocabulary 1024: it evaluates on the corpus), optionally damaged."""
        path = self.tmp / name
        if not path.exists():
            torch.manual_seed(0)
            cfg = Config(model=model)
            cfg.data.tokenizer_type, cfg.data.tokenizer_model = "SentencePieceTokenizer", self.data["tokenizer"]
            write_layout_free(dict(TokenFormer(model).named_parameters()), cfg, str(path))
        if corrupt:
            damage(path / "tensors" / "final_norm.bias.safetensors", corrupt)
        return str(path)

    def text(self) -> bytes:
        """The corpus's .jsonl.zst as it is on disk (compressed)."""
        return Path(self.data["text"]).read_bytes()

    def file(self, name: str, content: bytes | str) -> str:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def bad_prefix(self, idx: Callable[[bytes], bytes] = lambda b: b, bin_: Callable[[bytes], bytes] = lambda b: b):
        """A copy of the corpus prefix with its .idx and/or .bin rewritten."""
        prefix = self.tmp / "bad_text_document"
        for ext, change in ((".idx", idx), (".bin", bin_)):
            Path(str(prefix) + ext).write_bytes(change(Path(self.data["prefix"] + ext).read_bytes()))
        return str(prefix)


def damage(path: Path, how: str) -> None:
    """'flip': a bit of the data; 'truncate': the last 4 bytes cut; 'header': a byte of safetensors' JSON header."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-1] ^= 0x01
    elif how == "truncate":
        data = data[:-4]
    else:
        data[12] ^= 0x20  # after the 8-byte header length: inside the JSON
    path.write_bytes(bytes(data))


def run_checkpoints(env: Env) -> str:
    """A run's checkpoint directory (it holds `latest`), as the trainer leaves it."""
    (env.tmp / "run" / "checkpoints").mkdir(parents=True)
    (env.tmp / "run" / "checkpoints" / "latest").write_text("global_step1")
    return str(env.tmp / "run" / "checkpoints")


def config_file(env: Env, text: str) -> list[str]:
    return ["--config", env.file("bad.yaml", text), "--run-dir", str(env.run)]


@dataclass
class Case:
    id: str
    tool: str  # train, preprocess, reshard, evaluate, generate, convert, inspect
    argv: Callable[[Env], list[str]]
    expect: tuple[str, ...]  # fragments of the one error line; {tmp} and {run} are filled in
    rc: int = 2
    needs: Callable[[], bool] = lambda: True


def T(id, overrides, *expect, needs=lambda: True):
    """A row of trainer overrides."""
    return Case(id, "train", lambda env: env.train(**overrides), expect, needs=needs)


BAD_TENSOR = ("tensor final_norm.bias", "{tmp}/ckpt/tensors/final_norm.bias.safetensors")

CASES = [
    # --- 1. configuration keys, refused before any process group, allocation or data loading ---
    *[T(f"{key}_not_positive", {f"model.{key}": 0}, f"model.{key}: must be positive")
      for key in ("num_layers", "hidden_size", "qkv_tokens", "proj_tokens", "ffn_tokens", "seq_length",
                  "qkv_scale_tokens", "proj_scale_tokens", "ffn_scale_tokens")],
    T("num_heads_not_dividing", {"model.num_heads": 3}, "model.num_heads: 3 heads do not divide hidden_size 128"),
    T("norm_unknown", {"model.norm": "relu"}, "model.norm: 'relu' is not one of"),
    T("arch_unknown", {"model.arch": "mamba"}, "model.arch: 'mamba' is not one of ('tokenformer', 'transformer')"),
    T("ffn_hidden_size_for_tokenformer", {"model.ffn_hidden_size": 512},
      "model.ffn_hidden_size: 512: means nothing for model.arch tokenformer, whose FFN is a Pattention of "
      "model.ffn_tokens parameter tokens"),
    T("ffn_hidden_size_not_positive", {"model.arch": "transformer", "model.ffn_hidden_size": 0},
      "model.ffn_hidden_size: 0: must be positive (or null: 4 x hidden_size)"),
    T("ffn_hidden_size_not_an_integer", {"model.arch": "transformer", "model.ffn_hidden_size": 2.5},
      "model.ffn_hidden_size: expected an integer, got 2.5"),
    T("scale_tokens_for_transformer", {"model.arch": "transformer", "model.ffn_scale_tokens": 64},
      "model.ffn_scale_tokens: means nothing for model.arch transformer (no Pattention, no tau)"),
    *[T(f"{key}_for_transformer", {"model.arch": "transformer", f"train.{key}": True},
        f"train.{key}: acts on Pattention layers, which model.arch transformer has none of")
      for key in ("fused_pattention", "recompute_pattention_gelu")],
    T("vocab_size_zero", {"model.vocab_size": 0}, "model.vocab_size: 0: must be positive"),
    T("pad_vocab_multiple_zero", {"model.pad_vocab_multiple": 0}, "model.pad_vocab_multiple: 0: must be >= 1"),
    T("rotary_pct_above_one", {"model.rotary_pct": 1.5}, "model.rotary_pct: must be within [0, 1]"),
    T("rotary_base_zero", {"model.rotary_base": 0}, "model.rotary_base: 0.0: must be positive"),
    T("layernorm_eps_zero", {"model.layernorm_eps": 0}, "model.layernorm_eps: 0.0: must be positive"),
    T("init_std_negative", {"model.init_std": -0.02}, "model.init_std: -0.02: must be positive"),
    T("prefixes_empty", {"data.prefixes": []}, "data.prefixes: no training data given"),
    Case("prefix_missing", "train", lambda env: env.train(**{"data.prefixes": [f"{env.tmp}/none"]}),
         ("data.prefixes[0]: {tmp}/none.bin does not exist",)),
    T("tokenizer_type_unknown", {"data.tokenizer_type": "GPT2BPETokenizer"}, "data.tokenizer_type: 'GPT2BPETokenizer'"),
    Case("cache_dir_is_a_file", "train", lambda env: env.train(**{"data.cache_dir": env.file("afile", "x")}),
         ("data.cache_dir: {tmp}/afile is a file, not a directory",)),
    T("steps_zero", {"train.steps": 0}, "train.steps: must be positive"),
    T("micro_batch_size_zero", {"train.micro_batch_size": 0}, "train.micro_batch_size: must be positive"),
    T("grad_accum_steps_zero", {"train.grad_accum_steps": 0}, "train.grad_accum_steps: must be positive"),
    T("warmup_steps_negative", {"train.warmup_steps": -1}, "train.warmup_steps: must be >= 0"),
    T("old_tokens_lr_mult_negative", {"train.old_tokens_lr_mult": -1}, "train.old_tokens_lr_mult: must be >= 0"),
    T("precision_unknown", {"train.precision": "fp8"}, "train.precision: 'fp8': auto, fp32, bf16 or fp16"),
    T("device_unknown", {"train.device": "tpu"}, "train.device: 'tpu': auto, cpu or cuda"),
    *[T(f"{key}_not_a_bool", {key: "maybe"}, f"{key}: expected true/false, got 'maybe'")
      for key in ("train.activation_checkpointing", "train.fused_pattention", "train.recompute_pattention_gelu",
                  "train.compile", "parallel.sequence_parallel", "parallel.overlap_grad_reduce",
                  "data.reset_attention_mask", "data.reset_position_ids", "data.eod_mask_loss")],
    T("fused_pattention_with_softmax", {"train.fused_pattention": True, "model.norm": "softmax"},
      "train.fused_pattention: fused kernels exist for model.norm=l2_norm_gelu only"),
    T("tp_not_dividing_heads", {"parallel.tp": 3}, "parallel.tp: tp=3 does not divide model.num_heads=4"),
    T("pp_above_layers", {"parallel.pp": 3}, "parallel.pp: 3 stages for 2 layers"),
    T("zero_stage_3", {"parallel.zero_stage": 3}, "parallel.zero_stage: 3: 1 or 2"),
    T("cp_zero", {"parallel.cp": 0}, "parallel.cp: must be >= 1"),
    T("cp_not_splitting_the_sequence", {"parallel.cp": 3},
      "parallel.cp: cp=3 cannot split model.seq_length=64: context parallelism cuts each sequence into 2*cp = 6 "
      "equal chunks, so seq_length must be a multiple of 6"),
    T("sequence_parallel_uneven", {"parallel.tp": 2, "parallel.sequence_parallel": True, "model.seq_length": 63},
      "parallel.sequence_parallel: tp=2 does not divide model.seq_length=63"),
    T("grad_bucket_size_zero", {"parallel.grad_bucket_size": 0}, "parallel.grad_bucket_size: must be positive"),
    # bf16 at ZeRO-1 is DeepSpeed's BF16_Optimizer: one reduction after backward whatever these say
    T("overlap_grad_reduce_bf16_zero1", {"train.precision": "bf16", "parallel.overlap_grad_reduce": True},
      "parallel.overlap_grad_reduce: has no effect in bf16", "use parallel.zero_stage 2"),
    T("grad_bucket_size_bf16_zero1", {"train.precision": "bf16", "parallel.grad_bucket_size": 100_000},
      "parallel.grad_bucket_size: has no effect in bf16", "BF16_Optimizer, plain and pipeline engine alike"),
    T("overlap_grad_reduce_bf16_pp2", {"train.precision": "bf16", "parallel.pp": 2,
                                       "parallel.overlap_grad_reduce": True},
      "parallel.overlap_grad_reduce: has no effect in bf16", "with parallel.pp > 1 ZeRO-2 is refused"),
    T("overlap_grad_reduce_auto_on_a_gpu", {"parallel.overlap_grad_reduce": True},
      "parallel.overlap_grad_reduce: has no effect in bf16", needs=torch.cuda.is_available),
    T("timeout_s_zero", {"parallel.timeout_s": 0}, "parallel.timeout_s: must be a positive number of seconds"),
    T("spike_loss_factor_below_1", {"train.spike_loss_factor": 0.9},
      "train.spike_loss_factor: 0.9: must be > 1"),
    T("spike_grad_norm_factor_1", {"train.spike_grad_norm_factor": 1}, "train.spike_grad_norm_factor: 1: must be > 1"),
    T("spike_window_0", {"train.spike_window": 0}, "train.spike_window: 0: must be >= 1"),
    T("spike_max_skips_negative", {"train.spike_max_skips": -1}, "train.spike_max_skips: -1: must be >= 0"),
    T("spike_max_rollbacks_negative", {"train.spike_max_rollbacks": -1}, "train.spike_max_rollbacks: -1: must be >= 0"),
    T("straggler_threshold_negative", {"train.straggler_threshold": -0.1},
      "train.straggler_threshold: -0.1: must be >= 0"),
    T("hang_timeout_s_negative", {"train.hang_timeout_s": -1}, "train.hang_timeout_s: -1: must be >= 0"),
    T("hang_timeout_s_not_under_timeout_s", {"train.hang_timeout_s": 600, "parallel.timeout_s": 600},
      "train.hang_timeout_s: 600 s is not under parallel.timeout_s 600 s"),
    T("grad_reduce_dtype_unknown", {"parallel.grad_reduce_dtype": "fp8"}, "parallel.grad_reduce_dtype: 'fp8': fp32 or"),
    T("global_batch_size_zero", {"train.global_batch_size": 0, "train.grad_accum_steps": "null"},
      "train.global_batch_size: must be positive"),
    T("global_batch_size_and_accumulation", {"train.global_batch_size": 8},
      "train.global_batch_size and train.grad_accum_steps: set one of them"),
    T("global_batch_size_not_shared", {"train.global_batch_size": 3, "train.grad_accum_steps": "null"},
      "train.global_batch_size: 3 sequences is not a multiple of micro_batch_size 2 x data-parallel size 1"),
    T("tensorboard_not_a_bool", {"logging.tensorboard": "maybe"}, "logging.tensorboard: expected true/false"),
    T("wandb_project_not_a_name", {"logging.wandb_project": "[1, 2]"}, "logging.wandb_project: expected str"),
    T("wandb_mode_unknown", {"logging.wandb_mode": "cloud"}, "logging.wandb_mode: 'cloud': online or offline"),
    # the growth recipe (config.GrowthRecipe): the trainer's config section and the resharding tool read it
    *[T(f"growth_{key}_{v}", {f"growth.{key}": v, **extra}, f"growth.{key}: {msg}") for key, v, extra, msg in [
        ("preset", "paper", {}, "'paper' is not a recipe: preserve, reference"),
        ("key_init", "ones", {}, "'ones': zeros or normal"),
        ("key_std", 0, {}, "0.0: must be positive"),
        ("value_init", "zeros", {}, "zeros with zero new keys: the new tokens would never learn"),
        ("value_std", -1, {}, "-1.0: must be positive"),
        ("noise_std", -0.1, {}, "-0.1: must be >= 0 (0: no noise)"),
        ("noise", "gaussian", {}, "'gaussian': relative or absolute"),
        ("tau", "fixed", {}, "'fixed': pinned or follow"),
        ("optimizer", "sgd", {}, "'sgd': keep or reset"),
        ("seed", -1, {}, "-1: must be within [0, 2**63)"),
        ("lr", 0, {}, "0.0: must be positive (None: train.lr)"),
        ("lr", "nan", {}, "nan is not a finite number"),
        ("min_lr", 1e-3, {"growth.lr": 1e-4}, "0.001 is above the stage's lr 0.0001"),
        ("warmup_steps", -1, {}, "-1: must be >= 0"),
        ("steps", 0, {}, "0: must be positive (None: train.steps)")]],
    Case("checkpoint_load_missing", "train", lambda env: env.train(**{"checkpoint.load": f"{env.tmp}/none"}),
         ("checkpoint.load: {tmp}/none does not exist",)),
    Case("checkpoint_load_not_a_checkpoint", "train", lambda env: env.train(**{"checkpoint.load": other_dir(env)}),
         ("checkpoint.load: {tmp}/other is not a checkpoint: neither a layout-free checkpoint (it has no "
          "manifest.json) nor a run's checkpoints/ directory",)),
    T("lr_negative", {"train.lr": -1}, "train.lr: -1.0: must be positive"),
    T("lr_zero", {"train.lr": 0, "train.min_lr": 0}, "train.lr: 0.0: must be positive"),
    T("lr_inf", {"train.lr": "inf"}, "train.lr: inf is not a finite number"),
    T("lr_nan", {"train.lr": "nan"}, "train.lr: nan is not a finite number"),
    T("min_lr_negative", {"train.min_lr": -1e-5}, "train.min_lr: -1e-05: must be within [0, train.lr]"),
    T("min_lr_above_lr", {"train.min_lr": 1.0}, "train.min_lr: 1.0 is above train.lr"),
    T("beta1_one", {"train.beta1": 1.0}, "train.beta1: 1.0: must be within [0, 1)"),
    T("beta2_negative", {"train.beta2": -0.1}, "train.beta2: -0.1: must be within [0, 1)"),
    T("adam_eps_zero", {"train.adam_eps": 0}, "train.adam_eps: 0.0: must be positive"),
    T("clip_grad_negative", {"train.clip_grad": -1}, "train.clip_grad: -1.0: must be >= 0 (0: no clipping)"),
    T("weight_decay_negative", {"train.weight_decay": -0.1}, "train.weight_decay: -0.1: must be >= 0"),
    T("log_interval_zero", {"train.log_interval": 0}, "train.log_interval: 0: must be >= 1"),
    T("eval_iters_negative", {"train.eval_iters": -1}, "train.eval_iters: -1: must be >= 0 (0: never validate)"),
    T("eval_interval_negative", {"train.eval_interval": -1}, "train.eval_interval: -1: must be >= 0 (0: never"),
    T("exit_after_steps_negative", {"train.exit_after_steps": -1}, "train.exit_after_steps: -1: must be >= 0"),
    T("save_interval_negative", {"checkpoint.save_interval": -1}, "checkpoint.save_interval: -1: must be >= 0 (0: "
      "save only at the end"),
    T("keep_last_negative", {"checkpoint.keep_last": -1}, "checkpoint.keep_last: -1: must be >= 0 (0: keep every"),
    T("prefetch_steps_negative", {"data.prefetch_steps": -1}, "data.prefetch_steps: -1: must be >= 0"),
    T("async_save_not_a_bool", {"checkpoint.async_save": "maybe"}, "checkpoint.async_save: expected true/false"),
    T("seed_negative", {"train.seed": -1}, "train.seed: -1: must be within [0, 2**32)"),
    T("split_garbage", {"data.split": "abc"}, "data.split: 'abc': three comma-separated shares"),
    T("split_two_parts", {"data.split": "98,2"}, "data.split: '98,2': three comma-separated shares"),
    T("split_all_zero", {"data.split": "0,0,0"}, "data.split: '0,0,0': three comma-separated shares"),
    T("split_nan", {"data.split": "nan,1,0"}, "data.split: 'nan,1,0'"),
    T("split_without_validation", {"data.split": "100,0,0", "train.eval_interval": 10},
      "data.split: '100,0,0' gives validation no share, but train.eval_interval=10 asks for validation"),
    T("weights_negative", {"data.weights": [-1.0]}, "data.weights: [-1.0]: must be positive"),
    T("weights_zero", {"data.weights": [0.0]}, "data.weights: [0.0]: must be positive"),
    T("fp16_on_cpu", {"train.precision": "fp16"}, "train.precision: fp16 needs a GPU"),
    T("cuda_without_gpu", {"train.device": "cuda"}, "train.device: cuda, but no CUDA device is visible",
      needs=lambda: not torch.cuda.is_available()),
    Case("tokenizer_json_as_sentencepiece", "train", lambda env: env.train(**{"data.tokenizer_model": NEOX}),
         (f"data.tokenizer_model: {NEOX}: not a SentencePiece .model file",)),
    Case("sentencepiece_as_hf", "train", lambda env: env.train(**{"data.tokenizer_type": "HFTokenizer"}),
         ("data.tokenizer_model: ", "sp.model: not a tokenizers JSON file (tokenizer.json), as tokenizer type "
          "HFTokenizer needs"),),
    Case("idx_garbage", "train", lambda env: env.train(**{
        "data.prefixes": [env.bad_prefix(idx=lambda b: b"garbage" + b[7:])]}),
         ("data.prefixes[0]: {tmp}/bad_text_document.idx: not a megatron-core index",)),
    Case("idx_truncated", "train", lambda env: env.train(**{
        "data.prefixes": [env.bad_prefix(idx=lambda b: b[:-8])]}),
         ("data.prefixes[0]: {tmp}/bad_text_document.idx: ", "truncated or corrupt")),
    Case("bin_truncated", "train", lambda env: env.train(**{
        "data.prefixes": [env.bad_prefix(bin_=lambda b: b[:-100])]}),
         ("data.prefixes[0]: {tmp}/bad_text_document.bin: ", "truncated, or not the pair of this index")),
    Case("config_is_a_directory", "train", lambda env: ["--config", str(env.tmp), "--run-dir", str(env.run)],
         ("{tmp}: is a directory, not a YAML config file",)),
    Case("config_empty", "train", lambda env: config_file(env, "# nothing yet\n"),
         ("{tmp}/bad.yaml: the file is empty (no settings), expected a mapping of sections",)),
    Case("config_top_level_list", "train", lambda env: config_file(env, "- model\n- train\n"),
         ("{tmp}/bad.yaml: the top level is a list, expected a mapping of sections",)),
    Case("config_duplicate_section", "train", lambda env: config_file(
        env, "train:\n  steps: 10\nmodel:\n  num_layers: 2\ntrain:\n  lr: 1.0e-3\n"),
         ("{tmp}/bad.yaml: line 5: key 'train' given twice (first on line 1)",)),
    Case("config_duplicate_key", "train", lambda env: config_file(env, "train:\n  steps: 10\n  steps: 20\n"),
         ("{tmp}/bad.yaml: line 3: key 'steps' given twice (first on line 2)",)),
    Case("run_dir_is_a_file", "train", lambda env: env.train(run_dir=env.file("afile", "x")),
         ("run_dir: {tmp}/afile is a file, not a directory",)),
    Case("run_dir_unwritable", "train", lambda env: env.train(run_dir=f"{UNWRITABLE}/tokenformer_run"),
         (f"run_dir: {UNWRITABLE}/tokenformer_run cannot be written ({UNWRITABLE}: ",),
         needs=lambda: os.path.isdir(UNWRITABLE)),

    # --- 0/3. the preprocessing tool: nothing under the final name unless documents were written ---
    Case("preprocess_binary_named_jsonl", "preprocess", lambda env: preprocess_args(
        env, env.file("in.jsonl", env.text())), ("no documents read from {tmp}/in.jsonl", "bad lines")),
    Case("preprocess_input_is_a_directory", "preprocess", lambda env: preprocess_args(env, other_dir(env)),
         ("input {tmp}/other is a directory, not a file: name its files, e.g. '{tmp}/other/*.jsonl.zst'",)),
    Case("preprocess_documents_all_empty", "preprocess", lambda env: preprocess_args(
        env, env.file("in.jsonl", '{"text": ""}\n' * 10)),
         ("every document read from {tmp}/in.jsonl has an empty 'text' (10 documents, no tokens): nothing written",)),
    Case("preprocess_empty_file", "preprocess", lambda env: preprocess_args(env, env.file("in.jsonl", b"")),
         ("no documents read from {tmp}/in.jsonl (0 bad lines)",)),
    Case("preprocess_jsonl_named_zst", "preprocess", lambda env: preprocess_args(
        env, env.file("in.jsonl.zst", '{"text": "a"}\n' * 10)), ("{tmp}/in.jsonl.zst: corrupt or truncated zstd",)),
    Case("preprocess_wrong_json_key", "preprocess", lambda env: preprocess_args(
        env, env.file("in.jsonl", '{"text": "a"}\n' * 10), "--json-keys", "content"),
         ("no documents read from {tmp}/in.jsonl (10 bad lines; the first: {tmp}/in.jsonl:1: missing key "
          "'content')",)),
    Case("preprocess_truncated_zst", "preprocess", lambda env: preprocess_args(
        env, env.file("in.jsonl.zst", env.text()[: len(env.text()) // 2])),
         ("{tmp}/in.jsonl.zst: corrupt or truncated zstd stream after line", "documents read from it",
          "stream ends inside a frame (truncated file)", "bytes decompressed", "pass --allow-truncated")),
    Case("preprocess_unwritable_output", "preprocess", lambda env: preprocess_args(
        env, env.data["text"], out=f"{UNWRITABLE}/tokenformer_out"),
         (f"{UNWRITABLE}/tokenformer_out_text_document.tmp",), needs=lambda: os.path.isdir(UNWRITABLE)),

    # --- 0/3. the resharding tool: never over its source or a run's checkpoints; a growth must grow ---
    Case("reshard_save_is_source", "reshard", lambda env: ["--load", env.ckpt(), "--save", env.ckpt(), "--overwrite",
                                                           "--tp", "2"], ("--save {tmp}/ckpt: is the source",)),
    Case("reshard_save_inside_source", "reshard", lambda env: ["--load", env.ckpt(), "--save", f"{env.ckpt()}/x",
                                                               "--tp", "2"], ("overlaps the source",)),
    Case("reshard_save_over_run_checkpoints", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", run_checkpoints(env), "--overwrite", "--tp", "2"],
         ("--save {tmp}/run/checkpoints: inside a run's checkpoint directory {tmp}/run/checkpoints",)),
    Case("reshard_save_inside_run_checkpoints", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", run_checkpoints(env) + "/tp2", "--tp", "2"],
         ("inside a run's checkpoint directory {tmp}/run/checkpoints",)),
    Case("reshard_overwrite_other_dir", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", other_dir(env), "--overwrite", "--tp", "2"],
         ("{tmp}/other exists and is not a layout-free checkpoint",)),
    *[Case(f"reshard_expand_factor_{name}", "reshard",
           lambda env, f=f: ["--load", env.ckpt(), "--save", f"{env.tmp}/out", "--expand-factor", f], (msg,))
      for name, f, msg in [
          ("1", "1.0", "--expand-factor 1 grows nothing"),
          ("0", "0", "--expand-factor 0.0: must be a finite number above 1"),
          ("negative", "-2", "--expand-factor -2.0: must be a finite number above 1"),
          ("inf", "inf", "--expand-factor inf: must be a finite number above 1"),
          ("nan", "nan", "--expand-factor nan: must be a finite number above 1"),
          ("half", "0.5", "--expand-factor 0.5 < 1 shrinks every Pattention, dropping trained tokens: refused unless "
                          "shrinking is asked for explicitly (--allow-shrink); did you mean 2?")]],
    *[Case(f"reshard_recipe_{name}", "reshard",
           lambda env, flags=flags: ["--load", env.ckpt(), "--save", f"{env.tmp}/out", "--expand-factor", "2", *flags],
           (msg,)) for name, flags, msg in [
        ("unknown", ["--recipe", "paper"], "--recipe: 'paper' is not a recipe: preserve, reference"),
        ("key_std_zero", ["--key-std", "0"], "--key-std: 0.0: must be positive"),
        ("noise_std_negative", ["--noise-std", "-0.1"], "--noise-std: -0.1: must be >= 0"),
        ("noise_std_nan", ["--noise-std", "nan"], "--noise-std: nan is not a finite number"),
        ("tau_unknown", ["--tau", "sideways"], "--tau: 'sideways': pinned or follow"),
        ("dead_new_tokens", ["--value-init", "zeros"], "--value-init: zeros with zero new keys"),
        ("stage_lr_zero", ["--stage-lr", "0"], "--stage-lr: 0.0: must be positive"),
        ("stage_min_lr_above_lr", ["--stage-lr", "1e-4", "--stage-min-lr", "1e-3"],
         "--stage-min-lr: 0.001 is above the stage's lr 0.0001")]],
    Case("reshard_recipe_without_growth", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", f"{env.tmp}/out", "--tp", "2", "--key-init", "normal"],
         ("--key-init: a growth recipe setting, but nothing grows",)),
    Case("reshard_optimizer_unknown", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", f"{env.tmp}/out", "--tp", "2", "--optimizer", "sgd"],
         ("--optimizer: 'sgd': keep or reset",)),
    Case("reshard_recipe_file_bad", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", f"{env.tmp}/out", "--expand-config",
        env.file("stage.yaml", "model:\n  qkv_tokens: 60\ngrowth:\n  noise: gaussian\n")],
         ("{tmp}/stage.yaml: growth.noise: 'gaussian': relative or absolute",)),
    *[Case(f"reshard_grow_transformer_{how}", "reshard", lambda env, how=how: [
        "--load", env.ckpt(model=TRANSFORMER_MODEL, name="transformer"), "--save", f"{env.tmp}/out", *how.split()],
           ("{tmp}/transformer: model.arch transformer: growth appends parameter tokens to Pattention layers, which "
            "a transformer has none of",))
      for how in ("--expand-factor 2", "--tokens qkv=60,proj=36,ffn=140")],
    Case("reshard_expand_config_transformer", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", f"{env.tmp}/out", "--expand-config", "configs/transformer-354m.yaml"],
         ("--expand-config configs/transformer-354m.yaml: model.arch transformer has no parameter tokens to grow to",)),
    Case("export_neox_transformer", "convert", lambda env: [
        "export-neox", "--load", env.ckpt(model=TRANSFORMER_MODEL, name="transformer"), "--save", f"{env.tmp}/neox"],
         ("{tmp}/transformer: model.arch transformer: the official layout holds TokenFormers only",)),
    Case("reshard_tokens_unchanged", "reshard", lambda env: [
        "--load", env.ckpt(), "--save", f"{env.tmp}/out", "--tokens", "qkv=30,proj=18,ffn=70"],
         ("expansion to the token counts the checkpoint has (qkv=30, proj=18, ffn=70) grows nothing",)),

    # --- 2. a damaged layout-free checkpoint, for every reader: one error naming the tensor and its file ---
    *[Case(f"{tool}_{how}", tool, lambda env, how=how, argv=argv: argv(env, env.ckpt(corrupt=how)), BAD_TENSOR)
      for how in ("flip", "truncate", "header")
      for tool, argv in [
          ("evaluate", lambda env, c: ["--load", c, "--data", env.data["prefix"], "--max-docs", "5"]),
          ("generate", lambda env, c: ["--load", c, "--max-new-tokens", "2"]),
          ("convert", lambda env, c: ["export", "--load", c, "--save", f"{env.tmp}/export"]),
          ("reshard", lambda env, c: ["--load", c, "--save", f"{env.tmp}/out", "--tp", "2"])]],
    *[Case(f"inspect_verify_{how}", "inspect", lambda env, how=how: ["--verify", env.ckpt(corrupt=how)], BAD_TENSOR)
      for how in ("flip", "truncate", "header")],
    Case("inspect_verify_damaged_latest", "inspect", lambda env: ["--verify", run_with_damaged_latest(env)],
         ("{tmp}/run/checkpoints/latest names global_step2, which has no valid manifest.json",
          "(the newest complete one is global_step1: verify it by its directory)")),
    Case("inspect_truncated_manifest", "inspect", lambda env: ["--verify", truncate_manifest(env.ckpt())],
         ("{tmp}/ckpt/manifest.json: the manifest is not valid JSON (truncated or corrupt)",)),
    Case("evaluate_truncated_manifest", "evaluate", lambda env: [
        "--load", truncate_manifest(env.ckpt()), "--data", env.data["prefix"]],
         ("{tmp}/ckpt/manifest.json: the manifest is not valid JSON (truncated or corrupt)",)),
]


def _config_keys(cls=Config, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        sub = typing.get_type_hints(cls)[f.name]
        out |= _config_keys(sub, f"{prefix}{f.name}.") if dataclasses.is_dataclass(sub) else {prefix + f.name}
    return out


def test_every_config_key_has_a_row():
    """A new option is not done until the table refuses a bad value of it, by name."""
    named = {m.group(1) for c in CASES if c.tool == "train" and (m := re.match(r"([a-z_]+(\.[a-z_0-9]+)?)[:\[]",
                                                                                 c.expect[0]))}
    assert _config_keys() - named == set()


def preprocess_args(env: Env, src: str, *extra: str, out: str | None = None) -> list[str]:
    return ["--input", src, "--output-prefix", out or f"{env.tmp}/out", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", env.data["tokenizer"], "--workers", "1", *extra]


def other_dir(env: Env) -> str:
    (env.tmp / "other").mkdir()
    (env.tmp / "other" / "mine.txt").write_text("not a checkpoint")
    return str(env.tmp / "other")


def run_with_damaged_latest(env: Env) -> str:
    """A run's checkpoints/: global_step1 complete, global_step2 (which `latest` names) with a truncated manifest."""
    ckpts = Path(run_checkpoints(env))
    for tag in ("global_step1", "global_step2"):
        shutil.copytree(env.ckpt(), ckpts / tag)
    (ckpts / "latest").write_text("global_step2")
    truncate_manifest(str(ckpts / "global_step2"))
    return str(ckpts)


def truncate_manifest(ckpt: str) -> str:
    path = Path(ckpt) / "manifest.json"
    path.write_bytes(path.read_bytes()[:100])
    return ckpt


def _tool_main(tool: str) -> Callable[[list[str]], int]:
    if tool == "train":
        from tokenformer_mp.train import main
        return main
    name = {"preprocess": "preprocess_data", "reshard": "reshard_checkpoint", "evaluate": "evaluate",
            "generate": "generate", "convert": "convert_checkpoint", "inspect": "inspect_checkpoint"}[tool]
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _scratch(env: Env) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(scratch_prefix(f"{env.tmp}/out")) + "*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_name(case, corpus, tmp_path, capsys, monkeypatch):
    if not case.needs():
        pytest.skip("not meaningful on this machine")
    monkeypatch.chdir(REPO)
    env = Env(tmp_path, corpus, tmp_path / "run_new")
    argv = case.argv(env)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    rc = _tool_main(case.tool)(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # besides progress bars
    assert rc == case.rc and len(errors) == 1 and err.rstrip().endswith(errors[0]), (rc, err[-3000:])
    assert "Traceback" not in err, err
    for fragment in case.expect:
        assert fragment.format(tmp=tmp_path, run=env.run) in errors[0], errors[0]
    assert _snapshot(tmp_path) == before, "created or removed files"
    assert not env.run.exists() and not dist.is_initialized()
    assert not _scratch(env) and not glob.glob(f"{UNWRITABLE}/tokenformer_*")


def test_full_disk_names_the_path(corpus, tmp_path):
    """A write that fails (a full disk; here the file-size limit, which fails write() the same way) is one line
    naming the file, scratch or output, and leaves nothing behind. The limit is below one batch's scratch file, or
    above it (a batch of one document) but below the output. One process for both: megatron's import is slow."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset(corpus["prefix"])  # held: its arrays are views of its memory map
    sizes = 2 * dataset.sequence_lengths.astype(int)  # output bytes per document (uint16 tokens)
    runs = {"scratch": (1000, 64), "output": (2 * int(sizes.max()), 1)}  # (file-size limit, documents per batch)
    assert sizes.sum() > runs["output"][0]
    envs = {where: Env(tmp_path / where, corpus, tmp_path / "run") for where in runs}
    code = ["import resource, signal, sys", "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)",
            "sys.path.insert(0, 'tools')", "import preprocess_data"]
    for where, (limit, batch) in runs.items():
        envs[where].tmp.mkdir()
        argv = preprocess_args(envs[where], corpus["text"], "--batch-size", str(batch))
        code += [f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))",
                 f"print('rc', preprocess_data.main({argv}), file=sys.stderr)"]
    res = subprocess.run([sys.executable, "-c", "\n".join(code)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith(("error: ", "rc "))]
    assert len(errors) == 4 and errors[1] == errors[3] == "rc 2", res.stderr[-3000:]
    for where, line in zip(runs, errors[::2]):
        named = os.path.join(tempfile.gettempdir(), scratch_prefix(f"{envs[where].tmp}/out")) if where == "scratch" \
            else f"{envs[where].tmp}/out_text_document.tmp"
        assert line.startswith(f"error: {named}"), (where, line)
        assert line.endswith((": File too large", "(is the disk full?)")), (where, line)
        assert list(envs[where].tmp.iterdir()) == [] and not _scratch(envs[where])


def test_divergence_in_fp32_stops_with_exit_3_and_keeps_the_good_checkpoints(corpus, tmp_path):
    """An infinite grad norm in fp32 is divergence, not an fp16 overflow: exit 3 at that step, nothing saved after
    it; what was saved before stays complete and `latest`."""
    args = _args(debug_overrides(corpus, tmp_path, **{
        "train.steps": 20, "train.lr": 1e6, "train.min_lr": 0.0, "train.warmup_steps": 0,
        "checkpoint.save_interval": 1, "checkpoint.keep_last": 3}))
    res = subprocess.run([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "fp16 overflow" not in res.stdout
    # the spike guard rolls back twice (train.spike_max_rollbacks) to the last checkpoint, and meets it again
    m = re.search(r"error: step (\d+): loss (\S+), grad norm (\S+) is not finite; 2 rollback\(s\) already "
                  r"\(train.spike_max_rollbacks 2\): stopping", res.stderr)
    assert m is not None, res.stderr[-2000:]
    step = int(m.group(1))
    complete, partial = scan(str(tmp_path / "checkpoints"))
    assert read_latest(str(tmp_path / "checkpoints")) == f"global_step{step - 1}" and not partial
    assert [tag for _, tag, _ in complete] == [f"global_step{s}" for s in range(max(1, step - 3), step)]
