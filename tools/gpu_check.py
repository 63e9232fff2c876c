#!/usr/bin/env python
"""Everything about the GPU path that a CPU cannot prove, in one run on the first GPU machine (1-8 GPUs, one node):

  bash tools/gpu_check.sh                    # or: python tools/gpu_check.py [--out FILE] [--budget-s 480]

1. tests/test_gpu.py: Pattention in bf16, the layout matrix over NCCL (1 GPU; TP=2, PP=2, DP=2, sequence parallel,
   compile with 2; TP=2 x PP=2 with 4) against the CPU's fp32 run, a layout-free load followed by fused AdamW steps
   (at TP=2 with 2 GPUs), srun-style tasks that each see one GPU;
2. tools/benchmark.py --only pattention mfu generate long_context (bf16 on the GPU: Pattention against the MLP, MFU
   of tokenformer-150m and 450m against the measured and the datasheet peak, generation with the KV cache, the
   long-context memory prediction against the GPU's peak for tokenformer-150m at 32k).
Writes one JSON (default bench_out/gpu_check.json) and exits 0 when nothing failed. What the machine cannot do is
skipped with the reason (no GPU at all: everything, exit 0); a part that would overrun the time budget is skipped too.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from tokenformer_mp.bench.gpu_check import run  # noqa: E402
from tokenformer_mp.checkpoint import write_atomic  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/gpu_check.json")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for everything (default 8 min)")
    args = ap.parse_args(argv)
    result = run(args.budget_s)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_atomic(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
