"""The GPU check: what a CPU cannot prove about the GPU path, in parts ordered by value within a budget.

  bash tools/gpu_check.sh --python python3 --wheelhouse WHEELS --out OUT     # a node without network
  bash tools/gpu_check.sh --out OUT                                         # a machine that reaches the registry
  tokenformer-gpu-check --out OUT [--budget-s 400] [--device cuda|cpu] [--parts a,b]

(a) environment: torch, CUDA, NCCL, the GPU, its bf16 matmul TFLOP/s; (b) one-GPU training of the debug config, resumed
bit-exact, sync and async saves; (c) Pattention bf16 numerics and CP's flash chunks; (d) one GPU against the CPU's
fp32 run; (e) tokenformer-150m MFU, eager then compiled; (f) the long-context memory prediction; (g) export-hf and
generate; (h) with 2+ GPUs, TP2/PP2/DP2/CP2 over NCCL. OUT gets log.txt, results.json (after every part), each part's
JUnit XML and benchmark JSON. Exit 0 only when every part that ran passed; `--device cpu` rehearses (a), (b), (d), (g).
"""
import argparse
import sys

from ..bench.gpu_check import PARTS, Check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/gpu_check")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget for every part (default 400)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: rehearse the parts a CPU can run (a, b, d, g)")
    ap.add_argument("--parts", default=None, help="comma-separated part letters (default: all)")
    args = ap.parse_args(argv)
    keys = args.parts.split(",") if args.parts else None
    unknown = sorted(set(keys or []) - {p.key for p in PARTS})
    if unknown:
        ap.error(f"--parts: no part {', '.join(unknown)} (parts: {', '.join(p.key for p in PARTS)})")
    return 0 if Check(args.out, args.budget_s, args.device).run(keys)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
