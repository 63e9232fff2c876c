"""One typed config: dataclasses loaded from YAML, overridden by dotted command-line keys, validated up front.

A key the schema does not know is an error (with a suggestion), never a silent default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
PATTENTION_KINDS = ("qkv", "proj", "ffn")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    # Parameter tokens per Pattention kind: Q/K/V each, the output projection, the FFN.
    qkv_tokens: int = 128
    proj_tokens: int = 128
    ffn_tokens: int = 512
    # tau = sqrt(scale_tokens). Pinned to the count a layer was first built with, so appending tokens with zero keys
    # leaves the function unchanged. None: the current token count (a model that never grew).
    qkv_scale_tokens: int | None = None
    proj_scale_tokens: int | None = None
    ffn_scale_tokens: int | None = None
    norm: str = "l2_norm_gelu"
    seq_length: int = 256
    # Embedding rows. None: the tokenizer's vocabulary padded up to a multiple of pad_vocab_multiple.
    vocab_size: int | None = None
    pad_vocab_multiple: int = 128
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    layernorm_eps: float = 1e-5
    init_std: float = 0.02

    def tokens(self, kind: str) -> int:
        return getattr(self, f"{kind}_tokens")

    def scale_tokens(self, kind: str) -> int:
        return getattr(self, f"{kind}_scale_tokens") or self.tokens(kind)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class DataConfig:
    # Indexed-dataset prefixes (P for P.bin/P.idx) and optional blending weights.
    prefixes: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    split: str = "98,2,0"  # train,valid,test shares of each prefix's documents (Megatron's format)
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str = ""
    cache_dir: str | None = None  # megatron's index cache; None: next to the run directory


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum_steps: int = 1  # also the number of pipeline micro-batches per step
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # After growth: learning-rate multiplier for the parameter tokens the checkpoint had before its last expansion
    # (its manifest's grown_from); 0 freezes them. 1: one rate for all tokens (the paper's recipe).
    old_tokens_lr_mult: float = 1.0
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or fp32 / bf16 / fp16
    device: str = "auto"  # auto: cuda when available, else cpu
    activation_checkpointing: bool = False
    # l2_norm_gelu's elementwise work in compiled kernels (tokenformer_mp.kernels): 5 memory passes over the scores
    # instead of 15. Same maths; meant for GPUs (on a CPU eager is faster, README Benchmarks).
    fused_pattention: bool = False
    # Keep each Pattention's scores but not their GELU (the value matmul's input, [tokens, n]); compute it again in
    # backward: a third less activation memory for one more elementwise pass (README, Benchmarks).
    recompute_pattention_gelu: bool = False
    # torch.compile each block (torchtitan's per-block compile): Inductor fuses the LayerNorms, rotary, Pattention's
    # norm and GELU and the residual adds around the matmuls (Triton on a GPU, C++ on a CPU). Same maths; the first
    # step and the first evaluation pay for compiling (README, Benchmarks).
    compile: bool = False
    log_interval: int = 1
    exit_after_steps: int = 0  # >0: save and exit after this many steps of this invocation (schedule unchanged)
    eval_interval: int = 50
    eval_iters: int = 5


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1  # data parallel takes the rest of the world
    zero_stage: int = 1
    # Megatron's sequence parallelism: activations between Pattentions split over the TP group
    # (layer norms, residuals and layer inputs TP times smaller, same bytes on the wire). No effect at tp 1.
    sequence_parallel: bool = False
    # Data-parallel gradient reduction in buckets of grad_bucket_size elements (ZeRO's): overlapped, each bucket is
    # reduced as soon as backward has filled it (DeepSpeed's overlap_comm, Megatron's --overlap-grad-reduce).
    # grad_bucket_size None: 4e7 elements when overlapping (Megatron's default), else one bucket for all.
    overlap_grad_reduce: bool = False
    grad_bucket_size: int | None = None
    # How long a collective may wait for the slowest rank before the job fails (NCCL/gloo), also megatron-core's
    # groups (whole minutes there). A crashed rank is ended at once by srun --kill-on-bad-exit (slurm/).
    timeout_s: int = 600
    # bf16 training: the dtype of the data-parallel gradient reduction (accumulation is always fp32 under bf16).
    grad_reduce_dtype: str = "fp32"


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2
    load: str | None = None  # a checkpoint to start from; the run directory's own checkpoints, if any, come first


@dataclass
class LoggingConfig:
    """Where the metrics go besides run_dir/metrics.jsonl (written by global rank 0 only)."""
    tensorboard: bool = True  # run_dir/tensorboard
    wandb_project: str | None = None  # a Weights & Biases project; None: no W&B
    wandb_mode: str = "online"  # online, or offline (a run directory under run_dir/wandb, `wandb sync` later)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/debug"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- building from dicts, with strict keys and types -------------------------------------------------------------

def _coerce(value, tp, key: str):
    """Check (and gently convert int->float) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp in (float, str) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value) -> None:
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[last] = value


def parse_overrides(args: list[str]) -> dict[str, object]:
    """['--train.steps', '20', '--parallel.tp=2'] -> {'train.steps': 20, 'parallel.tp': 2} (values parsed as YAML)."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out[key] = _scalar(raw)
    return out


def _scalar(raw: str):
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_config(path: str | None = None, overrides: dict[str, object] | None = None) -> Config:
    """YAML file (or defaults) + dotted overrides -> Config, checked for structure (validate() checks meaning)."""
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from e
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def pad_vocab(vocab: int, multiple: int) -> int:
    return int(math.ceil(vocab / multiple) * multiple)


def validate(cfg: Config, *, check_paths: bool = True, tokenizer_vocab: int | None = None,
             world_size: int | None = None) -> None:
    """Everything that can be known before any process group or allocation. Raises ConfigError naming the key."""
    m, t, p = cfg.model, cfg.train, cfg.parallel

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    for key in ("num_layers", "hidden_size", "num_heads", "seq_length") + tuple(f"{k}_tokens" for k in PATTENTION_KINDS):
        need(getattr(m, key) > 0, f"model.{key}", "must be positive")
    need(m.hidden_size % m.num_heads == 0, "model.num_heads",
         f"{m.num_heads} heads do not divide hidden_size {m.hidden_size}")
    need(m.norm in NORMS, "model.norm", f"{m.norm!r} is not one of {NORMS}")
    need(not t.fused_pattention or m.norm == "l2_norm_gelu", "train.fused_pattention",
         f"fused kernels exist for model.norm=l2_norm_gelu only, not {m.norm!r}")
    need(0.0 <= m.rotary_pct <= 1.0, "model.rotary_pct", "must be within [0, 1]")
    need(int(m.head_dim * m.rotary_pct) % 2 == 0, "model.rotary_pct",
         f"rotary dims {int(m.head_dim * m.rotary_pct)} of head_dim {m.head_dim} must be even")
    for k in PATTENTION_KINDS:
        s = getattr(m, f"{k}_scale_tokens")
        need(s is None or s > 0, f"model.{k}_scale_tokens", "must be positive")
    if m.vocab_size is not None and tokenizer_vocab is not None:
        need(tokenizer_vocab <= m.vocab_size, "model.vocab_size",
             f"the tokenizer has {tokenizer_vocab} ids, more than the embedding's {m.vocab_size} rows")

    need(t.steps > 0, "train.steps", "must be positive")
    need(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    need(t.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
    need(0 <= t.warmup_steps, "train.warmup_steps", "must be >= 0")
    need(t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} is above train.lr {t.lr}")
    need(t.old_tokens_lr_mult >= 0, "train.old_tokens_lr_mult", "must be >= 0 (0 freezes the old tokens)")
    need(t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", f"{t.precision!r}: auto, fp32, bf16 or fp16")
    need(t.device in ("auto", "cpu", "cuda"), "train.device", f"{t.device!r}: auto, cpu or cuda")

    need(p.tp >= 1, "parallel.tp", "must be >= 1")
    need(p.pp >= 1, "parallel.pp", "must be >= 1")
    need(p.zero_stage in (1, 2), "parallel.zero_stage",
         f"{p.zero_stage}: 1 or 2 (ZeRO-0 reports no grad norm and miscounts replicated and tied parameters under "
         f"TP/PP; at DP=1, ZeRO-1 partitions nothing)")
    need(not (p.pp > 1 and p.zero_stage > 1), "parallel.zero_stage",
         "ZeRO-2 is refused by DeepSpeed's pipeline engine: use zero_stage 1 with parallel.pp > 1")
    need(p.grad_bucket_size is None or p.grad_bucket_size > 0, "parallel.grad_bucket_size", "must be positive")
    need(p.timeout_s > 0, "parallel.timeout_s", "must be a positive number of seconds")
    need(p.grad_reduce_dtype in ("fp32", "bf16"), "parallel.grad_reduce_dtype", f"{p.grad_reduce_dtype!r}: fp32 or bf16")
    need(p.pp <= m.num_layers, "parallel.pp", f"{p.pp} stages for {m.num_layers} layers")
    need(m.num_heads % p.tp == 0, "parallel.tp", f"tp={p.tp} does not divide model.num_heads={m.num_heads}")
    need(not p.sequence_parallel or m.seq_length % p.tp == 0, "parallel.sequence_parallel",
         f"tp={p.tp} does not divide model.seq_length={m.seq_length}: the sequence is split over the TP ranks")
    if m.vocab_size is not None:
        need(m.vocab_size % p.tp == 0, "parallel.tp", f"tp={p.tp} does not divide model.vocab_size={m.vocab_size}")
    if world_size is not None:
        need(world_size % (p.tp * p.pp) == 0, "parallel",
             f"tp*pp = {p.tp}*{p.pp} does not divide the world size {world_size}")

    need(cfg.logging.wandb_mode in ("online", "offline"), "logging.wandb_mode",
         f"{cfg.logging.wandb_mode!r}: online or offline")

    d = cfg.data
    need(len(d.split.split(",")) == 3, "data.split", f"{d.split!r}: three comma-separated shares like '98,2,0'")
    if d.weights is not None:
        need(len(d.weights) == len(d.prefixes), "data.weights",
             f"{len(d.weights)} weights for {len(d.prefixes)} prefixes")
    need(d.tokenizer_type in ("SentencePieceTokenizer", "HFTokenizer"), "data.tokenizer_type",
         f"{d.tokenizer_type!r}: SentencePieceTokenizer or HFTokenizer")
    if check_paths:
        need(len(d.prefixes) > 0, "data.prefixes", "no training data given")
        for i, prefix in enumerate(d.prefixes):
            for ext in (".bin", ".idx"):
                need(os.path.exists(prefix + ext), f"data.prefixes[{i}]", f"{prefix + ext} does not exist")
        need(bool(d.tokenizer_model) and os.path.exists(d.tokenizer_model), "data.tokenizer_model",
             f"{d.tokenizer_model!r} does not exist")
