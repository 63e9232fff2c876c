"""One typed config: dataclasses loaded from YAML, overridden by dotted command-line keys, validated up front.

A key the schema does not know is an error (with a suggestion), never a silent default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field

import yaml

from . import versions
from .checkpoint_dirs import MANIFEST, is_checkpoint
from .data.indexed import check_indexed_dataset
from .errors import ConfigError  # a leaf: data/, below this module, raises it too
from .tokenizer import build_tokenizer

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
PATTENTION_KINDS = ("qkv", "proj", "ffn")
ARCHS = ("tokenformer", "transformer")


@dataclass
class ModelConfig:
    # tokenformer: every projection a Pattention. transformer: the paper's baseline, the same model with linear
    # Q/K/V/output projections and a Linear -> GELU -> Linear MLP in their place (no Pattention key applies).
    arch: str = "tokenformer"
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
    # arch transformer: the MLP's hidden width; None: 4 x hidden_size (GPT-2's, Pythia's).
    ffn_hidden_size: int | None = None

    @property
    def ffn_width(self) -> int:
        """The FFN's inner width: its parameter tokens (TokenFormer), its hidden units (Transformer)."""
        if self.arch == "transformer":
            return self.ffn_hidden_size or 4 * self.hidden_size
        return self.ffn_tokens

    def tokens(self, kind: str) -> int:
        return getattr(self, f"{kind}_tokens")

    def scale_tokens(self, kind: str) -> int:
        return getattr(self, f"{kind}_scale_tokens") or self.tokens(kind)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def output_std(self) -> float:
        """The init std of what writes into the residual stream (Pattention values, the baseline's output projections,
        new value tokens of a growth): the reference's "wang init", GPT-NeoX's for output layers."""
        return 2.0 / self.num_layers / math.sqrt(self.hidden_size)


@dataclass
class DataConfig:
    # Indexed-dataset prefixes (P for P.bin/P.idx) and optional blending weights.
    prefixes: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    split: str = "98,2,0"  # train,valid,test shares of each prefix's documents (Megatron's format)
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str = ""
    cache_dir: str | None = None  # megatron's index cache; None: next to the run directory
    # Steps of micro-batches assembled ahead by a background thread (pinned, copied without blocking on a GPU);
    # 0: assembled on the training thread when needed.
    prefetch_steps: int = 2
    # Samples are packed from many documents, each ended by an EOD token (Megatron's semantics for all three):
    reset_attention_mask: bool = False  # a token attends only within its own document
    reset_position_ids: bool = False  # rotary positions restart at 0 after each EOD
    eod_mask_loss: bool = False  # no loss where the input is an EOD (the next document's first token is no target)


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4  # sequences per forward on each data-parallel rank
    # The recipe's batch, in sequences per optimizer step, whatever the GPU count: the accumulation steps follow as
    # global_batch_size / (micro_batch_size x DP) (Megatron's --global-batch-size, GPT-NeoX's train_batch_size).
    global_batch_size: int | None = None
    # Or the accumulation steps themselves (also the pipeline's micro-batches per step); the global batch then grows
    # with DP. Not both; neither: 1.
    grad_accum_steps: int | None = None
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
    # backward: a third less activation memory for one more elementwise pass (docs/benchmarks.md).
    recompute_pattention_gelu: bool = False
    # torch.compile each block (torchtitan's per-block compile): Inductor fuses the LayerNorms, rotary, Pattention's
    # norm and GELU and the residual adds around the matmuls (Triton on a GPU, C++ on a CPU). Same maths; the first
    # step and the first evaluation pay for compiling (docs/benchmarks.md).
    compile: bool = False
    log_interval: int = 1
    exit_after_steps: int = 0  # >0: save and exit after this many steps of this invocation (schedule unchanged)
    # A step (and its boundary) not done in this many seconds ends the job with every rank's stacks and the ranks
    # that held it up named (tokenformer_mp/watchdog.py, exit 4); after 5 steps it follows 10x the slowest step, at
    # least 60 s. Under parallel.timeout_s, whose collective timeout names nobody. None: half of parallel.timeout_s,
    # at most 300 s. 0: off.
    hang_timeout_s: float | None = None
    # Every log interval, each rank's step time, input wait and time to its gradient reduction go to rank 0, which
    # names the rank furthest behind (RUN/ranks.jsonl, tokenformer_mp/straggler.py); a straggler when its lag is over
    # this fraction of the step time. 0: off.
    straggler_threshold: float = 0.1
    # The spike guard (tokenformer_mp/spike_guard.py): a step whose loss is over spike_loss_factor x the median of the
    # last spike_window applied steps', or whose grad norm is over spike_grad_norm_factor x theirs, is not applied;
    # spike_max_skips of them within spike_window steps, or a non-finite loss, roll the run back to its newest
    # checkpoint past their data; the rollback after spike_max_rollbacks ends the run (exit 3). A factor of 0: off.
    spike_loss_factor: float = 1.5
    spike_grad_norm_factor: float = 10.0
    spike_window: int = 100
    spike_max_skips: int = 5
    spike_max_rollbacks: int = 2
    eval_interval: int = 50
    eval_iters: int = 5

    def accum_steps(self, dp: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank, at `dp` data-parallel ranks."""
        if self.global_batch_size is None:
            return self.grad_accum_steps or 1
        per_pass = self.micro_batch_size * dp
        if self.grad_accum_steps is not None:
            raise ConfigError("train.global_batch_size and train.grad_accum_steps: set one of them (the global batch "
                              "fixes the recipe whatever the GPU count; the accumulation steps follow from it)")
        if self.global_batch_size % per_pass:
            raise ConfigError(f"train.global_batch_size: {self.global_batch_size} sequences is not a multiple of "
                              f"micro_batch_size {self.micro_batch_size} x data-parallel size {dp} = {per_pass}: "
                              f"change micro_batch_size, or the GPU count (DP = world / (tp * pp * cp))")
        return self.global_batch_size // per_pass

    def global_batch(self, dp: int) -> int:
        """Sequences per optimizer step at `dp` data-parallel ranks."""
        return self.micro_batch_size * self.accum_steps(dp) * dp


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1  # data parallel takes the rest of the world
    # Context parallelism: each sequence split over cp ranks (2cp chunks; rank r holds chunks r and 2cp-1-r), keys
    # and values all-gathered inside attention (parallel.context_parallel); DP = world / (tp * pp * cp).
    cp: int = 1
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

    def dp(self, world_size: int) -> int:
        """The data-parallel size at a world size: the rest of the world after TP, PP and CP."""
        return world_size // (self.tp * self.pp * self.cp)


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2
    load: str | None = None  # a checkpoint to start from; the run directory's own checkpoints, if any, come first
    # Write checkpoints in the background: training waits only while the state is copied to host memory, the shards
    # are written meanwhile, and `latest` moves once every rank has finished (a save waits for the one before it).
    async_save: bool = False


@dataclass
class LoggingConfig:
    """Where the metrics go besides run_dir/metrics.jsonl (written by global rank 0 only)."""
    tensorboard: bool = True  # run_dir/tensorboard
    wandb_project: str | None = None  # a Weights & Biases project; None: no W&B
    wandb_mode: str = "online"  # online, or offline (a run directory under run_dir/wandb, `wandb sync` later)


# Named growth recipes (docs/checkpoints.md); a GrowthRecipe field left None takes its preset's value.
GROWTH_PRESETS: dict[str, dict] = {
    # this project's: new keys zero and tau held at the old count keep the function exactly; Adam state kept
    "preserve": {"key_init": "zeros", "value_init": "normal", "noise_std": 0.0, "noise": "relative",
                 "tau": "pinned", "optimizer": "keep"},
    # the paper's code (github.com/Haiyang-W/TokenFormer, custom_load_fn_incremental): the large model initialised
    # as from scratch, the old tokens copied in front, tau = sqrt(new n), optimizer and LR schedule restarted
    "reference": {"key_init": "normal", "value_init": "normal", "noise_std": 0.0, "noise": "relative",
                  "tau": "follow", "optimizer": "reset"},
}
GROWTH_CHOICES = {"key_init": ("zeros", "normal"), "value_init": ("zeros", "normal"), "noise": ("relative", "absolute"),
                  "tau": ("pinned", "follow"), "optimizer": ("keep", "reset")}
GROWTH_STAGE_KEYS = ("lr", "min_lr", "warmup_steps", "steps")


@dataclass
class GrowthRecipe:
    """How a checkpoint grows into this config's token counts (tools/reshard_checkpoint.py --expand-config reads
    it; flags override) and how the grown model's new stage trains. The grown checkpoint records the resolved
    recipe; the trainer runs the stage it records, and refuses a config whose growth section says otherwise."""
    preset: str | None = None  # None: preserve
    key_init: str | None = None  # new key tokens: zeros or normal
    key_std: float | None = None  # None: model.init_std, as a fresh layer's keys
    value_init: str | None = None  # new value tokens: zeros or normal
    value_std: float | None = None  # None: 2 / num_layers / sqrt(hidden_size), as a fresh layer's values
    noise_std: float | None = None  # Gaussian noise added to every old parameter token (0: none)
    noise: str | None = None  # relative: noise_std times each tensor's own std; absolute: noise_std itself
    tau: str | None = None  # pinned: tau stays sqrt(old n) (function kept); follow: sqrt(new n)
    optimizer: str | None = None  # keep: Adam state for the old tokens (new ones start at zero); reset: none
    seed: int | None = None  # new tokens and noise; None: 0
    # The new stage's schedule (linear warmup, cosine from lr to min_lr at step `steps` after growth, then min_lr);
    # None: train.lr, train.min_lr, train.warmup_steps, train.steps.
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    steps: int | None = None

    def is_set(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def resolved(self, model: ModelConfig) -> dict:
        """Every field decided for `model` (the grown one): the preset's values, the stds as numbers. The stage's
        schedule stays None where train.* decides it."""
        default = {**GROWTH_PRESETS[self.preset or "preserve"], "preset": "preserve", "key_std": model.init_std,
                   "value_std": model.output_std, "seed": 0}
        return {f.name: default.get(f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                for f in dataclasses.fields(self)}


def check_growth(g: GrowthRecipe, name=lambda key: f"growth.{key}") -> None:
    """Refuses a bad recipe, naming the key by `name(key)` (a YAML key, or the resharding tool's flag)."""
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{name(key)}: {msg}")

    for f in dataclasses.fields(g):
        v = getattr(g, f.name)
        need(not isinstance(v, float) or math.isfinite(v), f.name, f"{v} is not a finite number")
    need(g.preset is None or g.preset in GROWTH_PRESETS, "preset",
         f"{g.preset!r} is not a recipe: {', '.join(GROWTH_PRESETS)}")
    for key, choices in GROWTH_CHOICES.items():
        v = getattr(g, key)
        need(v is None or v in choices, key, f"{v!r}: {' or '.join(choices)}")
    for key in ("key_std", "value_std"):
        v = getattr(g, key)
        need(v is None or v > 0, key, f"{v}: must be positive (None: a fresh layer's init)")
    need(g.noise_std is None or g.noise_std >= 0, "noise_std", f"{g.noise_std}: must be >= 0 (0: no noise)")
    need(g.seed is None or 0 <= g.seed < 2**63, "seed", f"{g.seed}: must be within [0, 2**63)")
    preset = GROWTH_PRESETS[g.preset or "preserve"]
    if (g.key_init or preset["key_init"]) == "zeros" and (g.value_init or preset["value_init"]) == "zeros":
        need(False, "value_init", "zeros with zero new keys: the new tokens would never learn (a zero score "
             "and a zero value give neither a gradient); make one of key_init and value_init normal")
    need(g.lr is None or g.lr > 0, "lr", f"{g.lr}: must be positive (None: train.lr)")
    need(g.min_lr is None or g.min_lr >= 0, "min_lr", f"{g.min_lr}: must be >= 0 (None: train.min_lr)")
    need(g.lr is None or g.min_lr is None or g.min_lr <= g.lr, "min_lr", f"{g.min_lr} is above the stage's lr {g.lr}")
    need(g.warmup_steps is None or g.warmup_steps >= 0, "warmup_steps",
         f"{g.warmup_steps}: must be >= 0 (None: train.warmup_steps)")
    need(g.steps is None or g.steps > 0, "steps", f"{g.steps}: must be positive (None: train.steps)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    growth: GrowthRecipe = field(default_factory=GrowthRecipe)
    run_dir: str = "runs/debug"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def inputs_carry_positions(self) -> bool:
        """Whether a micro-batch's inputs carry each token's position (data.batches.Packing), and pipeline stages
        pass them on: positions restarting per document, documents kept apart, or the sequence split over CP."""
        d = self.data
        return d.reset_position_ids or d.reset_attention_mask or self.parallel.cp > 1

    def hang_timeout(self) -> float:
        """train.hang_timeout_s, or its default: half of parallel.timeout_s, at most 300 s."""
        t = self.train.hang_timeout_s
        return min(300.0, self.parallel.timeout_s / 2) if t is None else t


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


def from_dict(cls, data: dict, prefix: str = ""):
    """A config dataclass (Config, or one section) from a mapping, every key checked and typed; `prefix` names a
    nested section in messages."""
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
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the later one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice (first on line "
                                  f"{seen[key] + 1}); the later one would silently win: keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(path: str | None = None, overrides: dict[str, object] | None = None) -> Config:
    """YAML file (or defaults) + dotted overrides -> Config, checked for structure (validate() checks meaning)."""
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        if os.path.isdir(path):
            raise ConfigError(f"{path}: is a directory, not a YAML config file")
        try:
            with open(path) as f:
                data = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read it: {e}") from None
        if not isinstance(data, dict):  # None: nothing but comments, if that; the defaults would train on no data
            what = "the file is empty (no settings)" if data is None else f"the top level is a {type(data).__name__}"
            raise ConfigError(f"{path}: {what}, expected a mapping of sections (model:, data:, train:, parallel:, "
                              f"checkpoint:, run_dir:)")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def pad_vocab(vocab: int, multiple: int) -> int:
    return int(math.ceil(vocab / multiple) * multiple)


def validate(cfg: Config, *, check_paths: bool = True, check_env: bool | None = None,
             tokenizer_vocab: int | None = None, world_size: int | None = None) -> None:
    """Everything that can be known before any process group or allocation. Raises ConfigError naming the key.

    check_paths: the data prefixes (.bin/.idx, the index read) and the tokenizer file (loaded as its type).
    check_env (default: check_paths): this machine can run it (device, precision) and run_dir can be written."""
    m, t, p = cfg.model, cfg.train, cfg.parallel

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    for name, section in (("model", m), ("data", cfg.data), ("train", t), ("parallel", p),
                          ("checkpoint", cfg.checkpoint)):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            need(all(not isinstance(x, float) or math.isfinite(x) for x in (v if isinstance(v, list) else [v])),
                 f"{name}.{f.name}", f"{v} is not a finite number")

    need(m.arch in ARCHS, "model.arch", f"{m.arch!r} is not one of {ARCHS}")
    if m.arch == "tokenformer":
        need(m.ffn_hidden_size is None, "model.ffn_hidden_size",
             f"{m.ffn_hidden_size}: means nothing for model.arch tokenformer, whose FFN is a Pattention of "
             f"model.ffn_tokens parameter tokens (leave it out, or set model.arch transformer)")
    else:
        need(m.ffn_hidden_size is None or m.ffn_hidden_size > 0, "model.ffn_hidden_size",
             f"{m.ffn_hidden_size}: must be positive (or null: 4 x hidden_size)")
        for k in PATTENTION_KINDS:  # a pinned tau says "grown TokenFormer": a transformer config made from one
            need(getattr(m, f"{k}_scale_tokens") is None, f"model.{k}_scale_tokens",
                 "means nothing for model.arch transformer (no Pattention, no tau): leave it out")
        for key in ("fused_pattention", "recompute_pattention_gelu"):
            need(not getattr(t, key), f"train.{key}", "acts on Pattention layers, which model.arch transformer has "
                 "none of: leave it false")
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
    need(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", f"{m.vocab_size}: must be positive (or null: "
         f"the tokenizer's, padded)")
    need(m.pad_vocab_multiple >= 1, "model.pad_vocab_multiple", f"{m.pad_vocab_multiple}: must be >= 1")
    if m.vocab_size is not None and tokenizer_vocab is not None:
        need(tokenizer_vocab <= m.vocab_size, "model.vocab_size",
             f"the tokenizer has {tokenizer_vocab} ids, more than the embedding's {m.vocab_size} rows")

    need(m.rotary_base > 0, "model.rotary_base", f"{m.rotary_base}: must be positive")
    need(m.layernorm_eps > 0, "model.layernorm_eps", f"{m.layernorm_eps}: must be positive")
    need(m.init_std > 0, "model.init_std", f"{m.init_std}: must be positive")

    need(t.steps > 0, "train.steps", "must be positive")
    need(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    need(t.grad_accum_steps is None or t.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
    need(t.global_batch_size is None or t.global_batch_size > 0, "train.global_batch_size", "must be positive")
    if t.global_batch_size is not None and t.grad_accum_steps is not None:
        t.accum_steps(1)  # the error that says: one of them
    need(0 <= t.warmup_steps, "train.warmup_steps", "must be >= 0")
    need(t.lr > 0, "train.lr", f"{t.lr}: must be positive (the schedule is relative to it), e.g. 6e-4")
    need(t.min_lr >= 0, "train.min_lr", f"{t.min_lr}: must be within [0, train.lr]")
    need(t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} is above train.lr {t.lr}")
    for key in ("beta1", "beta2"):
        need(0 <= getattr(t, key) < 1, f"train.{key}", f"{getattr(t, key)}: must be within [0, 1), e.g. 0.9 / 0.95")
    need(t.adam_eps > 0, "train.adam_eps", f"{t.adam_eps}: must be positive (0 divides 0 by 0 where a gradient is 0)")
    need(t.weight_decay >= 0, "train.weight_decay", f"{t.weight_decay}: must be >= 0 (0: no decay)")
    need(t.clip_grad >= 0, "train.clip_grad", f"{t.clip_grad}: must be >= 0 (0: no clipping)")
    need(0 <= t.seed < 2**32, "train.seed", f"{t.seed}: must be within [0, 2**32)")
    need(t.log_interval >= 1, "train.log_interval", f"{t.log_interval}: must be >= 1 (a log line every N steps)")
    need(t.eval_interval >= 0, "train.eval_interval", f"{t.eval_interval}: must be >= 0 (0: never validate)")
    need(t.eval_iters >= 0, "train.eval_iters", f"{t.eval_iters}: must be >= 0 (0: never validate)")
    need(t.exit_after_steps >= 0, "train.exit_after_steps", f"{t.exit_after_steps}: must be >= 0 (0: run to the end)")
    c = cfg.checkpoint
    need(c.save_interval >= 0, "checkpoint.save_interval",
         f"{c.save_interval}: must be >= 0 (0: save only at the end, at exit_after_steps and on a stop signal)")
    need(c.keep_last >= 0, "checkpoint.keep_last", f"{c.keep_last}: must be >= 0 (0: keep every checkpoint)")
    need(t.old_tokens_lr_mult >= 0, "train.old_tokens_lr_mult", "must be >= 0 (0 freezes the old tokens)")
    check_growth(cfg.growth)
    need(t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", f"{t.precision!r}: auto, fp32, bf16 or fp16")
    need(t.device in ("auto", "cpu", "cuda"), "train.device", f"{t.device!r}: auto, cpu or cuda")

    need(p.tp >= 1, "parallel.tp", "must be >= 1")
    need(p.pp >= 1, "parallel.pp", "must be >= 1")
    need(p.cp >= 1, "parallel.cp", "must be >= 1")
    need(p.cp == 1 or m.seq_length % (2 * p.cp) == 0, "parallel.cp",  # cp=1: no chunks
         f"cp={p.cp} cannot split model.seq_length={m.seq_length}: context parallelism cuts each sequence into "
         f"2*cp = {2 * p.cp} equal chunks, so seq_length must be a multiple of {2 * p.cp}")
    need(p.zero_stage in (1, 2), "parallel.zero_stage",
         f"{p.zero_stage}: 1 or 2 (ZeRO-0 reports no grad norm and miscounts replicated and tied parameters under "
         f"TP/PP; at DP=1, ZeRO-1 partitions nothing)")
    need(not (p.pp > 1 and p.zero_stage > 1), "parallel.zero_stage",
         "ZeRO-2 is refused by DeepSpeed's pipeline engine: use zero_stage 1 with parallel.pp > 1")
    need(p.grad_bucket_size is None or p.grad_bucket_size > 0, "parallel.grad_bucket_size", "must be positive")
    if t.precision == "bf16":
        _check_bf16_grad_reduce(p)
    need(p.timeout_s > 0, "parallel.timeout_s", "must be a positive number of seconds")
    for key in ("spike_loss_factor", "spike_grad_norm_factor"):
        v = getattr(t, key)
        need(v == 0 or v > 1, f"train.{key}", f"{v:g}: must be > 1 (a multiple of the recent median) or 0 (off)")
    need(t.spike_window >= 1, "train.spike_window", f"{t.spike_window}: must be >= 1 (steps)")
    need(t.spike_max_skips >= 0, "train.spike_max_skips", f"{t.spike_max_skips}: must be >= 0 (0: never roll back "
         f"for spikes)")
    need(t.spike_max_rollbacks >= 0, "train.spike_max_rollbacks", f"{t.spike_max_rollbacks}: must be >= 0")
    need(t.straggler_threshold >= 0, "train.straggler_threshold",
         f"{t.straggler_threshold:g}: must be >= 0 (a fraction of the step time; 0: no straggler report)")
    if t.hang_timeout_s is not None:  # None: derived from parallel.timeout_s (Config.hang_timeout)
        need(t.hang_timeout_s >= 0, "train.hang_timeout_s", f"{t.hang_timeout_s:g}: must be >= 0 (0: no hang watchdog)")
        need(t.hang_timeout_s < p.timeout_s, "train.hang_timeout_s",
             f"{t.hang_timeout_s:g} s is not under parallel.timeout_s {p.timeout_s} s: a hung collective would time "
             f"out first, naming nobody (0 turns the watchdog off)")
    need(p.grad_reduce_dtype in ("fp32", "bf16"), "parallel.grad_reduce_dtype", f"{p.grad_reduce_dtype!r}: fp32 or bf16")
    need(p.pp <= m.num_layers, "parallel.pp", f"{p.pp} stages for {m.num_layers} layers")
    need(m.num_heads % p.tp == 0, "parallel.tp", f"tp={p.tp} does not divide model.num_heads={m.num_heads}")
    need(not p.sequence_parallel or m.seq_length // p.cp % p.tp == 0, "parallel.sequence_parallel",
         f"tp={p.tp} does not divide model.seq_length={m.seq_length}" + (f" / cp={p.cp}" if p.cp > 1 else "")
         + ": the sequence is split over the TP ranks")
    if m.vocab_size is not None:
        need(m.vocab_size % p.tp == 0, "parallel.tp", f"tp={p.tp} does not divide model.vocab_size={m.vocab_size}")
    if world_size is not None:
        need(world_size % (p.tp * p.pp * p.cp) == 0, "parallel",
             f"tp*pp*cp = {p.tp}*{p.pp}*{p.cp} does not divide the world size {world_size}")
        t.accum_steps(p.dp(world_size))  # a global batch the data-parallel ranks cannot share

    need(cfg.logging.wandb_project is None or cfg.logging.wandb_project.strip() != "", "logging.wandb_project",
         "empty: a project name, or null for no Weights & Biases")
    need(cfg.logging.wandb_mode in ("online", "offline"), "logging.wandb_mode",
         f"{cfg.logging.wandb_mode!r}: online or offline")

    d = cfg.data
    shares = _split_shares(d.split)
    need(d.prefetch_steps >= 0, "data.prefetch_steps", f"{d.prefetch_steps}: must be >= 0 (0: no prefetching)")
    need(shares is not None, "data.split",
         f"{d.split!r}: three comma-separated shares >= 0 (train,valid,test) with a positive train share, "
         f"like '98,2,0'")
    need(shares[1] > 0 or not (t.eval_interval and t.eval_iters), "data.split",
         f"{d.split!r} gives validation no share, but train.eval_interval={t.eval_interval} asks for validation: "
         f"give it one (e.g. '98,2,0') or set train.eval_interval 0")
    if d.weights is not None:
        need(len(d.weights) == len(d.prefixes), "data.weights",
             f"{len(d.weights)} weights for {len(d.prefixes)} prefixes")
        need(all(w > 0 for w in d.weights), "data.weights",
             f"{d.weights}: must be positive (relative shares of the prefixes; leave a prefix out instead of 0)")
    need(d.tokenizer_type in ("SentencePieceTokenizer", "HFTokenizer"), "data.tokenizer_type",
         f"{d.tokenizer_type!r}: SentencePieceTokenizer or HFTokenizer")
    if check_paths:
        need(len(d.prefixes) > 0, "data.prefixes", "no training data given")
        for i, prefix in enumerate(d.prefixes):
            for ext in (".bin", ".idx"):
                need(os.path.exists(prefix + ext), f"data.prefixes[{i}]", f"{prefix + ext} does not exist")
            try:
                check_indexed_dataset(prefix)
            except ValueError as e:
                raise ConfigError(f"data.prefixes[{i}]: {e}") from None
        need(bool(d.tokenizer_model) and os.path.isfile(d.tokenizer_model), "data.tokenizer_model",
             f"{d.tokenizer_model!r} does not exist")
        try:
            build_tokenizer(d.tokenizer_type, d.tokenizer_model)
        except (ValueError, OSError) as e:
            raise ConfigError(f"data.tokenizer_model: {e}") from None
        load = cfg.checkpoint.load
        if load is not None:
            need(os.path.exists(load), "checkpoint.load",
                 f"{load} does not exist (a layout-free checkpoint or a run's checkpoints/ directory)")
            need(is_checkpoint(load), "checkpoint.load",
                 f"{load} is not a checkpoint: neither a layout-free checkpoint (it has no {MANIFEST}) nor a run's "
                 f"checkpoints/ directory (no 'latest', no global_step* directories)")
    if check_paths if check_env is None else check_env:
        _check_env(cfg)


def _split_shares(split: str) -> list[float] | None:
    """'98,2,0' -> [98.0, 2.0, 0.0]; None unless three finite shares >= 0 with a positive train share."""
    try:
        shares = [float(x) for x in split.split(",")]
    except ValueError:
        return None
    ok = len(shares) == 3 and all(math.isfinite(x) and x >= 0 for x in shares) and shares[0] > 0
    return shares if ok else None


def _check_bf16_grad_reduce(p: ParallelConfig) -> None:
    """Under bf16 (fp32 gradient accumulation) DeepSpeed's ZeRO-1 is its BF16_Optimizer, which takes neither
    overlap_comm nor reduce_bucket_size: the plain engine's allreduce_gradients and the pipeline engine's
    _bf16_reduce_grads both reduce after backward in fixed 5e8-element buckets. ZeRO-2 reads both."""
    key = next((k for k, v in (("overlap_grad_reduce", p.overlap_grad_reduce),
                               ("grad_bucket_size", p.grad_bucket_size is not None)) if v), None)
    if key is None or p.zero_stage != 1:
        return
    alternative = ("with parallel.pp > 1 ZeRO-2 is refused, so leave it unset or train in fp32" if p.pp > 1 else
                   "use parallel.zero_stage 2, which overlaps the reduction in grad_bucket_size buckets")
    raise ConfigError(f"parallel.{key}: has no effect in bf16 (train.precision bf16, or auto on a GPU) at "
                      f"parallel.zero_stage 1 (DeepSpeed's BF16_Optimizer, plain and pipeline engine alike, reduces "
                      f"the gradients after backward in fixed 5e8-element buckets): {alternative}")


def _check_env(cfg: Config) -> None:
    """This machine can run the config, and run_dir can be written: before any process group or allocation."""
    import torch  # here, not at the top: the config module stays importable in 0.07 s (tools, workers)

    try:
        versions.check(torch.__version__)
    except versions.UnsupportedVersion as e:
        raise ConfigError(str(e)) from None
    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: cuda, but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): use auto or cpu")
    on_gpu = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.precision == "fp16" and not on_gpu:
        raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed's loss-scaled fp16 optimizer); on a CPU use "
                          "fp32 or bf16 (or auto)")
    if t.precision == "auto" and on_gpu:  # bf16 here (train.resolve_precision)
        _check_bf16_grad_reduce(cfg.parallel)
    _check_writable_dir("run_dir", cfg.run_dir)
    if cfg.data.cache_dir is not None:
        _check_writable_dir("data.cache_dir", cfg.data.cache_dir)


def _check_writable_dir(key: str, path: str) -> None:
    """path is a directory, or can be made one, and a file can be written there; nothing is created."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ConfigError(f"{key}: {path} is a file, not a directory")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}: {path} cannot be created: {existing} is a file")
    try:  # the real test (permissions, a read-only mount, root on sysfs): an unnamed file, gone when closed
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ConfigError(f"{key}: {path} cannot be written ({existing}: {e.strerror})") from None
