"""Progressive scaling, reproduced small (the paper's Figures 3 and 4, its tables 6 and 7): a TokenFormer grown
S -> 2S -> 4S in parameters by parameter tokens alone, against Transformers of the same sizes trained from scratch,
on one trainer, one data loader and one FLOP count (model.flops_per_token). tools/reproduce_scaling.py is the command
line; docs/scaling.md the results.

Runs, each in this process, one after another:
  tokenformer-S                 from scratch for `steps` steps;
  tokenformer-2S, tokenformer-4S   grown from the size before (the growth recipe; preserve keeps the function), then
                                `stage_steps` more (a new warmup + cosine schedule): the paper's 300B then 30B tokens;
  transformer-S/2S/4S           from scratch for `steps` steps (the paper's Transformers at 300B tokens);
  transformer-2S/4S-same-tokens from scratch for `stage_steps` steps (its Transformers at the growth stages' 30B).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

from matplotlib.figure import Figure

from .config import Config, ConfigError, GrowthRecipe, load_config, pad_vocab
from .fileio import write_atomic
from .info import model_info
from .reshard import ExpandPlan, reshard
from .tokenizer import build_tokenizer
from .parallel.local import run_ranks
from .trainer import evaluate_checkpoint, train_history

KINDS = ("qkv", "proj", "ffn")
SHAPES = ("width", "mlp")  # how the Transformers grow (plan_sizes)
ROW_KEYS = ("step", "loss", "lr", "val_loss")  # what results.json keeps of a training record (validation steps only)


@dataclass
class Study:
    out: str
    tokenformer: str = "configs/debug.yaml"
    transformer: str = "configs/transformer-debug.yaml"
    overrides: dict = field(default_factory=dict)  # on every run of both archs (data, batch, a smaller model)
    factors: tuple[int, ...] = (1, 2, 4)
    steps: int = 400  # S's training, and every Transformer's from scratch
    stage_steps: int = 100  # each growth stage's, and the Transformers' at the same tokens
    eval_interval: int = 25
    eval_iters: int = 8
    recipe: GrowthRecipe = field(default_factory=GrowthRecipe)  # preserve: zero new keys, tau pinned
    transformer_shape: str = "width"  # plan_sizes


def base_config(path: str, overrides: dict) -> Config:
    """The config with its vocabulary resolved from the tokenizer, as the trainer resolves it."""
    cfg = load_config(path, overrides)
    if cfg.model.vocab_size is None:
        vocab = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size
        cfg.model.vocab_size = pad_vocab(vocab, cfg.model.pad_vocab_multiple)
    return cfg


def plan_sizes(tf: Config, tr: Config, factors: tuple[int, ...], shape: str = "width") -> dict[str, dict]:
    """Per factor f: the TokenFormer's token counts (the base's in proportion) whose total parameter count is f times
    the base's (growth by tokens leaves the embedding as it is, so 2x the parameters is more than 2x the tokens), and
    a Transformer of that count. shape "width": the hidden size (a multiple of 8 x num_heads, so that rotary's dims
    stay even) nearest a Transformer of that count with a 4h MLP, as the paper's baselines grow, then the MLP width
    that makes the count; "mlp": the config's hidden size, only the MLP widened."""
    if shape not in SHAPES:
        raise ConfigError(f"shape {shape!r}: {' or '.join(SHAPES)}")

    def info(cfg: Config, **model) -> dict:
        return model_info(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model)))

    def transformer(params: int) -> dict:
        h = tr.model.hidden_size
        if shape == "width":
            step = 8 * tr.model.num_heads
            h = min(range(step, 8 * tr.model.hidden_size + 1, step),
                    key=lambda w: abs(info(tr, hidden_size=w, ffn_hidden_size=4 * w)["params"] - params))
        one, two = (info(tr, hidden_size=h, ffn_hidden_size=w)["params"] for w in (1, 2))  # linear in the MLP width
        width = 1 + round((params - one) / (two - one))
        if width < 1:
            raise ConfigError(f"no Transformer MLP width gives {params} parameters at hidden_size {h} (attention "
                              f"alone has more): more tokens needed")
        return {"ffn_hidden_size": width, **info(tr, hidden_size=h, ffn_hidden_size=width)}

    base = info(tf)
    fixed = base["params"] - base["non_embedding_params"]  # the embedding and final norm
    sizes = {}
    for f in factors:
        r = (f * base["params"] - fixed) / base["non_embedding_params"]
        tokens = {f"{k}_tokens": round(tf.model.tokens(k) * r) for k in KINDS}
        t = info(tf, **tokens)
        sizes["S" if f == 1 else f"{f}S"] = {"factor": f, "tokenformer": {**tokens, **t},
                                              "transformer": transformer(t["params"])}
    return sizes


def flops_to_reach(rows: list[dict], loss: float) -> float | None:
    """The training FLOPs at which a validation curve first reaches `loss`, linear between evaluations; None: never."""
    prev = None
    for r in rows:
        if r["val_loss"] <= loss:
            if prev is None:
                return r["flops"]
            frac = (prev["val_loss"] - loss) / (prev["val_loss"] - r["val_loss"])
            return prev["flops"] + frac * (r["flops"] - prev["flops"])
        prev = r
    return None


def _record(hist: list[dict], arch: str, size: str, model: dict, steps: int, tokens_per_step: int,
            before: dict | None, seconds: float) -> dict:
    """A run's entry in results.json. FLOPs = flops_per_token x tokens; a grown stage's cumulative figures add every
    stage before it (`before`: the previous stage's entry)."""
    per_token = model["flops_per_token"]
    prior_tokens, prior_flops = (before["cumulative_tokens"], before["cumulative_flops"]) if before else (0, 0)
    rows = [{**{k: r[k] for k in ROW_KEYS}, "tokens": prior_tokens + r["step"] * tokens_per_step,
             "flops": prior_flops + r["step"] * tokens_per_step * per_token} for r in hist if "val_loss" in r]
    tokens = steps * tokens_per_step
    return {"arch": arch, "size": size, **{k: model[k] for k in ("params", "non_embedding_params")},
            "flops_per_token": per_token, "steps": steps, "tokens": tokens, "flops": tokens * per_token,
            "cumulative_tokens": prior_tokens + tokens, "cumulative_flops": prior_flops + tokens * per_token,
            "val_loss": rows[-1]["val_loss"], "seconds": seconds, "history": rows}


def run_study(study: Study, log=print) -> dict:
    """Every run of the study into study.out; returns (and writes) results.json's content."""
    start = time.perf_counter()
    common = {**study.overrides, "train.eval_interval": study.eval_interval, "train.eval_iters": study.eval_iters,
              "checkpoint.save_interval": 0}  # the final checkpoint alone (saved at the last step): growth's source
    tf, tr = base_config(study.tokenformer, common), base_config(study.transformer, common)
    sizes = plan_sizes(tf, tr, study.factors, study.transformer_shape)
    tokens_per_step = tf.train.global_batch(1) * tf.model.seq_length  # one process
    runs: dict[str, dict] = {}

    def train(name: str, config: str, overrides: dict) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        # each training in a process of its own, as a launcher would start it: nothing of one (a process group,
        # the launcher's environment, DeepSpeed's accelerator) is left to the next, or to the caller
        hist = run_ranks(1, train_history, config, {**common, **overrides, "run_dir": os.path.join(study.out, name)},
                         timeout=3600)[0]
        log(f"{name}: {overrides['train.steps']} steps, val loss {hist[-1]['val_loss']:.4f}, "
            f"{time.perf_counter() - t0:.0f} s")
        return hist, time.perf_counter() - t0

    prev = None
    for size, s in sizes.items():
        model = s["tokenformer"]
        over = {f"model.{k}_tokens": model[f"{k}_tokens"] for k in KINDS}
        if prev is None:
            over["train.steps"] = study.steps
        else:
            src, grown = os.path.join(study.out, f"tokenformer-{prev}"), os.path.join(study.out, f"grown-{size}")
            manifest = reshard(os.path.join(src, "checkpoints"), grown, overwrite=True, progress=False,
                               expand=ExpandPlan({k: model[f"{k}_tokens"] for k in KINDS}, study.recipe))
            # the grown model as the checkpoint records it (tau pinned or following n)
            over.update({f"model.{k}_scale_tokens": manifest["model"][f"{k}_scale_tokens"] for k in KINDS})
            over.update({"train.steps": study.stage_steps, "checkpoint.load": grown})
            with tempfile.TemporaryDirectory() as run_dir:  # the evaluation's own run record, not kept
                after = run_ranks(1, evaluate_checkpoint, study.tokenformer, {**common, **over, "run_dir": run_dir})[0]
        hist, seconds = train(f"tokenformer-{size}", study.tokenformer, over)
        before = runs.get(f"tokenformer-{prev}")
        runs[f"tokenformer-{size}"] = r = _record(hist, "tokenformer", size, model, over["train.steps"],
                                                  tokens_per_step, before, seconds)
        if before is not None:
            r.update(grown_from=prev, val_loss_before_growth=before["val_loss"], val_loss_after_growth=after)
        prev = size
    for size, s in sizes.items():
        for name, steps in ((f"transformer-{size}", study.steps),
                            (f"transformer-{size}-same-tokens", study.stage_steps if s["factor"] > 1 else None)):
            if steps is None:  # S has no growth stage to match
                continue
            over = {f"model.{k}": s["transformer"][k] for k in ("hidden_size", "ffn_hidden_size")}
            over["train.steps"] = steps
            hist, seconds = train(name, study.transformer, over)
            runs[name] = _record(hist, "transformer", size, s["transformer"], steps, tokens_per_step, None, seconds)
    results = {"study": {**dataclasses.asdict(study), "recipe": study.recipe.resolved(tf.model)},
               "tokens_per_step": tokens_per_step, "sizes": sizes, "runs": runs, "summary": summarize(sizes, runs),
               "seconds": time.perf_counter() - start}
    write_atomic(os.path.join(study.out, "results.json"), json.dumps(results, indent=1))
    return results


def summarize(sizes: dict, runs: dict) -> dict:
    """Per size above S: the grown TokenFormer against the Transformer from scratch and the one at the same tokens;
    what each needs in FLOPs to reach the other's final loss (None: it never does within its run)."""
    chain = [row for r in runs.values() if r["arch"] == "tokenformer" for row in r["history"]]  # cumulative FLOPs
    out = {}
    for size in list(sizes)[1:]:
        g, t, same = runs[f"tokenformer-{size}"], runs[f"transformer-{size}"], runs[f"transformer-{size}-same-tokens"]
        out[size] = {"grown_val_loss": g["val_loss"], "grown_cumulative_flops": g["cumulative_flops"],
                     "grown_stage_flops": g["flops"], "scratch_val_loss": t["val_loss"], "scratch_flops": t["flops"],
                     "same_tokens_val_loss": same["val_loss"], "same_tokens_flops": same["flops"],
                     "cumulative_flops_over_scratch": g["cumulative_flops"] / t["flops"],
                     "scratch_flops_to_grown_loss": flops_to_reach(t["history"], g["val_loss"]),
                     "grown_flops_to_scratch_loss": flops_to_reach(chain, t["val_loss"]),
                     "growth_val_change": g["val_loss_after_growth"] / g["val_loss_before_growth"] - 1}
    return out


def plot(results: dict, out: str) -> list[str]:
    """scaling_flops.png (Figure 3: validation loss against cumulative training FLOPs) and scaling_stages.png
    (Figure 4: against each stage's own FLOPs, with the Transformers at the growth stages' tokens)."""
    runs = results["runs"]
    tf = [r for r in runs.values() if r["arch"] == "tokenformer"]
    scratch = [runs[f"transformer-{s}"] for s in results["sizes"]]
    same = [r for n, r in runs.items() if n.endswith("-same-tokens")]
    paths = []
    for name, title, stage in (("scaling_flops.png", "cumulative training FLOPs (Figure 3)", False),
                               ("scaling_stages.png", "training FLOPs of each stage (Figure 4)", True)):
        fig = Figure(figsize=(7.5, 4.8))
        ax = fig.subplots()
        series = [("Transformer from scratch", "C0", "s", scratch),
                  (f"TokenFormer grown ({results['study']['recipe']['preset']})", "C3", "o", tf)]
        if stage:
            series.insert(1, ("Transformer, a growth stage's tokens", "C2", "^", same))
        for label, color, marker, rs in series:
            for r in rs:  # each run's validation curve, thin; a grown stage's from its own start in Figure 4
                shift = r["cumulative_flops"] - r["flops"] if stage else 0
                ax.plot([h["flops"] - shift for h in r["history"]], [h["val_loss"] for h in r["history"]],
                        color=color, lw=0.8, alpha=0.4)
            x = [r["flops"] if stage else r["cumulative_flops"] for r in rs]
            ax.plot(x, [r["val_loss"] for r in rs], marker=marker, color=color, lw=1.5, ms=7, label=label)
            for xi, r in zip(x, rs):
                ax.annotate(r["size"], (xi, r["val_loss"]), textcoords="offset points", xytext=(5, 4), color=color)
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("validation loss (nats)")
        ax.set_title("TokenFormer grown S -> 2S -> 4S vs Transformers from scratch")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=120)
    return paths
