"""Benchmarks against the project's limits; prints a table per section and writes JSON.

  tokenformer-benchmark                       # every section
  tokenformer-benchmark --only pattention mfu --out bench.json

Each figure is a ratio measured side by side in one run, so a noisy machine does not mislead.
"""
import argparse
import json
import os
import platform
import sys
import tempfile

import torch

from ..config import load_config
from ..fileio import write_atomic

# Sections read configs/, data/ and ../shared of a checkout: the one this package is in (run from it, or installed
# with pip install -e), else the current directory.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = _CHECKOUT if os.path.isdir(os.path.join(_CHECKOUT, "configs")) else os.getcwd()
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


# Each section imports its measurement module (..bench.*) when it runs: `--only pattention` then imports neither
# DeepSpeed nor megatron-core (4 s, measured on 2 cores), nor transformers (3 s).
def bench_environment():
    from ..bench.environment import describe
    return [describe()]


def bench_pattention():
    from ..bench.pattention import SHAPES, compare
    rows = [compare(*s) for s in SHAPES]
    if torch.cuda.is_available():
        rows += [compare(*s, device="cuda", dtype=torch.bfloat16) for s in SHAPES]
    return rows


def bench_pattention_parts():
    from ..bench.pattention import SHAPES, breakdown
    return breakdown(*SHAPES[-1])  # the narrow shape, where the overhead shows


WIDE = {"num_layers": 4, "hidden_size": 512, "num_heads": 8, "qkv_tokens": 512, "proj_tokens": 512, "ffn_tokens": 2048,
        "seq_length": 256}  # the 4-layer 512-wide model


def bench_mfu():
    from ..bench.train import measure
    small = {"train.steps": 8, "model.vocab_size": 4096}
    wide = {**small, **{f"model.{k}": v for k, v in WIDE.items()}, "train.micro_batch_size": 4}
    variants = (("", {}), (" compiled", {"train.compile": True}))
    if torch.cuda.is_available():  # the paper's sizes, bf16 against the GPU's own measured bf16 matmul peak
        # Without activation recomputation (MFU counts model FLOPs only); 8 x 2048 tokens fit an 80 GB GPU either way.
        # The CPU's small models would only measure start-up on a GPU. Plain runs first: the 45% target.
        # tokenformer-150m eager then compiled: what the GPU check (part e) has time for; BENCH_MFU_ALL=1 adds 450m,
        # the fused kernels and the recomputed GELU.
        gpu = {"train.steps": 10, "train.micro_batch_size": 8, "train.global_batch_size": 8,
               "train.activation_checkpointing": False}
        sizes = ("150m",)
        if os.environ.get("BENCH_MFU_ALL"):
            variants += ((" fused", {"train.fused_pattention": True}),)
            sizes = ("150m", "450m")
        runs = [(f"{n}{tag}", f"configs/tokenformer-{n}.yaml", {**gpu, **extra}) for n in sizes
                for tag, extra in variants]
        if os.environ.get("BENCH_MFU_ALL"):  # what recomputing Pattention's GELU costs where it matters
            runs.append(("450m gelu recomputed", "configs/tokenformer-450m.yaml",
                         {**gpu, "train.recompute_pattention_gelu": True}))
    else:
        runs = [(name + tag, "configs/debug.yaml", {**ov, **extra})
                for name, ov in (("debug", small), ("4x512", wide)) for tag, extra in variants]
    for name, cfg, ov in runs:  # one row at a time: a run cut short keeps the rows before it (main)
        yield {"model": name, **measure(cfg, ov)}


def bench_arch():
    """The TokenFormer's training step over the Transformer's at equal parameters and tokens per step, with the
    analytic FLOPs of each (equal: 2N per token for either). On a GPU the paper's 124M pair in bf16; on a CPU the
    debug pair (configs/transformer-debug.yaml matches configs/debug.yaml) and a 4-layer 256-wide pair in the
    paper's proportions (TokenFormer-124M's: 3h/4 tokens for Q/K/V/output, 3h for the FFN; the Transformer's MLP
    4h)."""
    import torch
    from ..bench.train import compare_archs
    if torch.cuda.is_available():
        gpu = {"train.steps": 10, "train.micro_batch_size": 8, "train.global_batch_size": 8,
               "train.activation_checkpointing": False}
        pairs = [("124m", ("configs/tokenformer-124m.yaml", gpu), ("configs/transformer-124m.yaml", gpu))]
    else:
        small = {"train.steps": 8, "model.vocab_size": 4096}
        shape = {**small, "model.num_layers": 4, "model.hidden_size": 256, "model.num_heads": 4,
                 "model.seq_length": 256, "train.micro_batch_size": 4}
        paper = {"model.qkv_tokens": 192, "model.proj_tokens": 192, "model.ffn_tokens": 768}
        pairs = [("debug", ("configs/debug.yaml", small), ("configs/transformer-debug.yaml", small)),
                 ("4x256", ("configs/debug.yaml", {**shape, **paper}),
                  ("configs/transformer-debug.yaml", {**shape, "model.ffn_hidden_size": 1024}))]
    for name, tokenformer, transformer in pairs:  # a row per pair as it comes (main)
        yield {"model": name, **compare_archs(tokenformer, transformer)}


LAYOUTS = [("tp1", 1, {}), ("tp2", 2, {"parallel.tp": 2}), ("tp4", 4, {"parallel.tp": 4}),
           ("pp2", 2, {"parallel.pp": 2}), ("dp2", 2, {"train.grad_accum_steps": 1}),
           ("tp2xpp2", 4, {"parallel.tp": 2, "parallel.pp": 2}),
           ("tp2 sp", 2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
           ("tp2xpp2 sp", 4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}),
           ("cp2", 2, {"parallel.cp": 2}), ("cp4", 4, {"parallel.cp": 4}),
           ("cp2xtp2", 4, {"parallel.cp": 2, "parallel.tp": 2}), ("cp2xpp2", 4, {"parallel.cp": 2, "parallel.pp": 2}),
           ("cp2xdp2", 4, {"parallel.cp": 2, "train.grad_accum_steps": 1}),
           ("cp2 documents", 2, {"parallel.cp": 2, "data.reset_attention_mask": True, "data.reset_position_ids": True,
                                 "data.eod_mask_loss": True})]


def bench_layouts():
    from ..bench.train import measure
    base = {"train.steps": 6, "model.vocab_size": 4096}
    rows = []
    for name, world, ov in LAYOUTS:
        device = {} if torch.cuda.device_count() >= world else {"train.device": "cpu"}  # a GPU per rank, or none
        r = measure("configs/debug.yaml", {**base, **ov, **device}, world=world)
        r["tp_bytes_match"] = r["tp_bytes_per_step"] == r["tp_bytes_analytic"]
        r["cp_bytes_match"] = r["cp_bytes_per_step"] == r["cp_bytes_analytic"]
        rows.append({"name": name, **r})
    return rows


def bench_activations():
    """Saved activations per rank by TP degree and sequence parallelism: the 4-layer 512-wide config of `mfu`."""
    from ..bench.memory import measure
    cfg = load_config("configs/debug.yaml", {"model.vocab_size": 4096, **{f"model.{k}": v for k, v in WIDE.items()}})
    return measure(cfg.model, micro_batch=4)


def bench_context_parallel():
    """Saved activations per rank by CP degree: the 4-layer 512-wide model at a 4,096-token context."""
    from ..bench.memory import by_context_parallel
    wide = {**{f"model.{k}": v for k, v in WIDE.items()}, "model.seq_length": 4096}
    return by_context_parallel(load_config("configs/debug.yaml", {"model.vocab_size": 4096, **wide}).model, 1)


def bench_long_context():
    """Memory per 80 GB GPU of tokenformer-150m and -1.5b at 32k and 128k contexts by CP degree (8 GPUs of ZeRO-1),
    from their activations per token measured in bf16: the layouts that fit (docs/parallelism.md)."""
    from ..bench.memory import long_context_fit
    # On a GPU the 150m rows the measurement is held to (the GPU check's part f); BENCH_LONG_CONTEXT_ALL=1 adds 1.5b,
    # whose per-token activations are measured on the host (minutes of a node's CPU, and its figures are in the docs).
    names = ("150m",) if torch.cuda.is_available() and not os.environ.get("BENCH_LONG_CONTEXT_ALL") else ("150m", "1.5b")
    rows = [{"model": name, **r} for name in names
            for r in long_context_fit(load_config(f"configs/tokenformer-{name}.yaml").model, (32768, 131072))]
    if torch.cuda.is_available():  # the prediction against the GPU's own peak, tokenformer-150m at 32k on one GPU
        from ..bench.memory import gpu_activation_peak
        cfg = load_config("configs/tokenformer-150m.yaml", {"model.seq_length": 32768}).model
        for r in rows:
            if (r["model"], r["context"], r["cp"]) == ("150m", 32768, 1):
                r["measured_gb"] = gpu_activation_peak(cfg, r["recompute"]) / 1e9
                r["error"] = r["measured_gb"] / r["activations_gb"] - 1
    return rows


def bench_preprocess():
    """At cores - 1 workers (the reading/writing process has a core of its own, as on any real node) and at one
    worker per core (oversubscribed: the reader's work then comes out of the tokenizers' time)."""
    from ..data.bench import benchmark_preprocessing
    shards = os.path.join(SHARED, "data", "minipile", "train-00000.jsonl.zst")
    cores = len(os.sched_getaffinity(0))
    rows = []
    tokenizers = [("gpt-neox-20b", "HFTokenizer", os.path.join(SHARED, "tokenizers/gpt-neox-20b/tokenizer.json")),
                  ("sentencepiece-4k (quickstart's)", "SentencePieceTokenizer", "data/tokenizer/sample.model")]
    for name, ttype, model in tokenizers:
        if not os.path.exists(model):
            continue
        for workers in sorted({max(1, cores - 1), cores}):
            # a whole shard (6,270 documents): throughput is a steady-state figure, and on a few thousand
            # documents the fixed costs (fork, first read, renames) would weigh several percent
            rows.append({"tokenizer": name, **benchmark_preprocessing([shards], ttype, model, workers=workers,
                                                                      max_docs=None)})
    return rows


def bench_reshard():
    from ..bench.reshard import measure
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", REPO)) as d:
        return [measure(os.path.join(REPO, "configs", c), os.path.join(d, "w")) for c in
                ("tokenformer-150m.yaml", "tokenformer-1.5b.yaml")]


def bench_generate():
    """Greedy decoding with the KV cache against re-reading the context every token (random weights)."""
    from ..bench.generate import measure
    debug = load_config("configs/debug.yaml", {"model.vocab_size": 4096}).model
    m150 = load_config("configs/tokenformer-150m.yaml").model
    rows = [measure(debug, 16, 100), measure(m150, 512, 64)]
    if torch.cuda.is_available():
        rows.append(measure(m150, 512, 256, device="cuda", dtype=torch.bfloat16))
    return rows


def bench_precision():
    """bf16 against fp32 over 50 steps of the debug model on the quickstart's data, 16 micro-batches a step: the
    gradients accumulated in fp32 (this project) or in bf16 (DeepSpeed's default)."""
    from ..bench.precision import drift
    if not os.path.exists("data/processed/sample_text_document.idx"):
        print("precision: run tools/quickstart.sh first (it preprocesses the debug model's data)")
        return [{"variant": "skipped: no data/processed/sample_text_document"}]
    return drift("configs/debug.yaml", {"train.micro_batch_size": 1, "train.grad_accum_steps": 16,
                                        "train.warmup_steps": 5, "train.eval_iters": 8, "train.log_interval": 50})


def bench_input():
    """Input wait per step of the debug model on the quickstart's data, micro-batches prefetched or not."""
    from ..bench.input import measure
    if not os.path.exists("data/processed/sample_text_document.idx"):
        return [{"prefetch_steps": "skipped: run tools/quickstart.sh first (it preprocesses the debug data)"}]
    return measure("configs/debug.yaml", {"train.device": "cpu"})


def bench_data_cache():
    """megatron-core's index build for 10^8 samples of 2,048 tokens (synthetic .idx): seconds and peak memory."""
    from ..bench.data_cache import measure
    return [measure(10**7), measure(10**8)]


def bench_init():
    """tokenformer-1.5b's initialisation per rank at TP=1, 2, 4, 8: seconds and peak host memory (one thread)."""
    from ..bench.init import measure
    return measure()


def bench_guards():
    """The hang watchdog, the straggler report and the spike guard: their own time per step at DP=2."""
    from ..bench.guards import run
    return run()


def bench_checkpoint_io():
    from ..bench.checkpoint_io import run
    return run()


SECTIONS = {"environment": (bench_environment, ["python", "torch", "cuda", "nccl", "gpus", "device", "memory_gb",
                                              "deepspeed", "megatron-core", "matmul_dtype", "matmul_tflops",
                                              "datasheet_tflops"]),
            "pattention": (bench_pattention, ["shape", "device", "dtype", "pattention_ms", "fused_ms", "mlp_ms",
                                              "ratio", "fused_ratio"]),
            "pattention_parts": (bench_pattention_parts, ["variant", "ms", "ratio"]),
            "mfu": (bench_mfu, ["model", "step_time_s", "tokens_per_s", "matmul_peak_flops", "matmul_peak_spread",
                                "mfu", "mfu_suspect", "mfu_datasheet", "peak_memory_gb"]),
            "arch": (bench_arch, ["model", "tf_params", "tf_tokens_per_step", "tf_gflop_per_step", "tf_step_s",
                                  "tr_gflop_per_step", "tr_step_s", "ratio", "tf_mfu", "tr_mfu"]),
            "layouts": (bench_layouts, ["name", "world", "step_time_s", "tokens_per_s", "tp_bytes_per_step",
                                        "tp_bytes_analytic", "tp_bytes_match", "cp_bytes_per_step", "cp_bytes_analytic",
                                        "cp_bytes_match", "bytes_per_step", "bytes_analytic",
                                        "bytes_match_every_rank"]),
            "activations": (bench_activations, ["layout", "recompute", "compiled", "activation_mb", "vs_tp1"]),
            "context_parallel": (bench_context_parallel, ["layout", "recompute", "activation_mb", "vs_cp1", "ideal",
                                                          "predicted_mb", "error"]),
            "long_context": (bench_long_context, ["model", "context", "cp", "recompute", "states_gb",
                                                  "activations_gb", "total_gb", "fits", "measured_gb", "error"]),
            "preprocess": (bench_preprocess, None),
            "generate": (bench_generate, ["model", "device", "prompt", "new_tokens", "cached_tok_s", "uncached_tok_s",
                                          "speedup", "same_tokens"]),
            "precision": (bench_precision, ["variant", "optimizer", "grad_accum_dtype", "final_loss",
                                            "max_rel_loss_diff", "final_rel_loss_diff", "val_loss", "val_rel_diff"]),
            "guards": (bench_guards, ["model", "guard", "step_ms", "guard_ms_per_step", "share_of_step"]),
            "input": (bench_input, ["prefetch_steps", "input_wait_ms", "step_time_ms", "wait_share"]),
            "data_cache": (bench_data_cache, ["samples", "seq_length", "documents", "tokens", "cache_gb", "seconds",
                                              "peak_rss_gb"]),
            "init": (bench_init, ["tp", "seconds", "vs_tp1", "params_gb", "peak_rss_gb"]),
            "checkpoint_io": (bench_checkpoint_io, ["world", "layout", "checkpoint_gb", "written_mb_per_rank",
                                                    "write_vs_ideal", "read_mb_per_rank", "read_vs_ideal",
                                                    "sync_blocked_s", "async_blocked_s", "async_blocked_vs_sync",
                                                    "async_total_s", "load_s", "within_targets"]),
            "reshard": (bench_reshard, ["config", "checkpoint_gb", "largest_tensor_mb", "seconds", "peak_rss_gb",
                                        "limit_gb", "within_limit"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS))
    ap.add_argument("--out", default="bench_out/benchmark.json")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name in args.only or list(SECTIONS):
        fn, cols = SECTIONS[name]
        rows = results[name] = []
        for row in fn():  # a section may yield its rows one at a time: each is kept as it comes
            rows.append(row)
            write_atomic(args.out, json.dumps(results, indent=1))  # a run cut short keeps what it measured
        print(f"\n## {name}\n" + table(rows, cols or [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]),
              flush=True)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
