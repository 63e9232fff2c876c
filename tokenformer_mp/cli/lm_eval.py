"""Evaluate any checkpoint or export with lm-evaluation-harness, on the project's own inference.

  tokenformer-lm-eval --load runs/debug/checkpoints --tasks lambada_openai,hellaswag --batch-size 16
  tokenformer-lm-eval --load hf_export/ --tasks my_task --include-path my_tasks/ --limit 100

Prints lm-eval's table; --output-path writes its results JSON (and with --log-samples every example).
"""
import argparse
import json
import sys

from lm_eval import simple_evaluate
from lm_eval.loggers import EvaluationTracker
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from ..checkpoint import CheckpointError
from ..harness import TokenFormerLM


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint directory, export or Hugging Face export")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--include-path", help="a folder of task YAMLs of your own")
    ap.add_argument("--limit", type=float, help="examples per task (a fraction below 1)")
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="weights and KV cache (scores are fp32); "
                    "default bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--device", help="default: cuda when available")
    ap.add_argument("--tokenizer-type", help="default: the one the checkpoint was trained with")
    ap.add_argument("--tokenizer-model")
    ap.add_argument("--output-path", help="folder for lm-eval's results JSON")
    ap.add_argument("--log-samples", action="store_true", help="also every example's scores (needs --output-path)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.log_samples and not args.output_path:
        ap.error("--log-samples needs --output-path")
    tasks = [t for t in args.tasks.split(",") if t]
    try:
        manager = TaskManager(include_path=args.include_path)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"--tasks: unknown {', '.join(unknown)} (lm-eval ls tasks lists them; your own YAMLs "
                             f"go in --include-path)")
        lm = TokenFormerLM(args.load, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                           tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tracker = EvaluationTracker(output_path=args.output_path)
    results = simple_evaluate(model=lm, model_args=f"pretrained={args.load}", tasks=tasks, task_manager=manager,
                              limit=args.limit,
                              num_fewshot=args.num_fewshot, log_samples=args.log_samples,
                              evaluation_tracker=tracker, random_seed=args.seed, numpy_random_seed=args.seed,
                              torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    samples = results.pop("samples", None)
    if args.output_path:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else []:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    print(json.dumps({t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                      for t, r in results["results"].items()}, default=handle_non_serializable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
