"""The scaling study (tokenformer_mp/scaling.py, tools/reproduce_scaling.py) at a tiny size: the sizes it plans, the
function kept across each growth, the FLOPs as stated, results.json's schema, and the tool's refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tokenformer_mp.config import load_config
from tokenformer_mp.model import flops_per_token
from tokenformer_mp.scaling import Study, flops_to_reach, plan_sizes, plot, run_study

TINY = {"model.hidden_size": 32, "model.num_heads": 2, "model.qkv_tokens": 32, "model.proj_tokens": 32,
        "model.ffn_tokens": 128, "model.seq_length": 64, "train.micro_batch_size": 2, "train.grad_accum_steps": 2,
        "train.warmup_steps": 2, "train.log_interval": 1, "train.device": "cpu"}
TOKENS_PER_STEP = 2 * 2 * 64
RUN_KEYS = {"arch", "size", "params", "non_embedding_params", "flops_per_token", "steps", "tokens", "flops",
            "cumulative_tokens", "cumulative_flops", "val_loss", "seconds", "history"}
SUMMARY_KEYS = {"grown_val_loss", "grown_cumulative_flops", "grown_stage_flops", "scratch_val_loss", "scratch_flops",
                "same_tokens_val_loss", "same_tokens_flops", "cumulative_flops_over_scratch",
                "scratch_flops_to_grown_loss", "grown_flops_to_scratch_loss", "growth_val_change"}


@pytest.fixture(scope="module")
def study(sample, tmp_path_factory):
    data = {"data.prefixes": [sample["prefix"]], "data.tokenizer_model": sample["tokenizer"],
            "data.tokenizer_type": "SentencePieceTokenizer"}
    s = Study(out=str(tmp_path_factory.mktemp("scaling")), overrides={**data, **TINY}, steps=6, stage_steps=4,
              eval_interval=2, eval_iters=1)
    env = dict(os.environ)
    results = run_study(s, log=lambda line: None)
    # every training ran in a process of its own: none left a process group or a launcher's variables here, which
    # the suite's later subprocesses would inherit
    assert not torch.distributed.is_initialized() and dict(os.environ) == env
    return s, results


def test_sizes_are_1_2_4_in_parameters_and_the_transformers_match(study):
    _, res = study
    sizes = res["sizes"]
    assert list(sizes) == ["S", "2S", "4S"]
    base = sizes["S"]["tokenformer"]["params"]
    for s in sizes.values():
        tf, tr = s["tokenformer"], s["transformer"]
        assert tf["params"] / base == pytest.approx(s["factor"], rel=0.01)
        assert tr["params"] / tf["params"] == pytest.approx(1, rel=0.01)
        assert (tf["arch"], tr["arch"]) == ("tokenformer", "transformer")
    # by tokens alone: the embedding stays, so 2x and 4x the parameters take 3x and 7x the non-embedding ones here
    assert sizes["S"]["tokenformer"]["qkv_tokens"] == 32 and sizes["2S"]["tokenformer"]["ffn_tokens"] == 384
    assert sizes["4S"]["tokenformer"]["hidden_size"] == 32


def test_growth_keeps_the_validation_loss(study):
    _, res = study
    for size, prev in (("2S", "S"), ("4S", "2S")):
        r = res["runs"][f"tokenformer-{size}"]
        assert r["grown_from"] == prev
        assert r["val_loss_before_growth"] == res["runs"][f"tokenformer-{prev}"]["val_loss"]
        assert abs(r["val_loss_after_growth"] / r["val_loss_before_growth"] - 1) < 1e-5
        assert res["summary"][size]["growth_val_change"] == pytest.approx(0, abs=1e-5)


def test_flops_are_flops_per_token_times_tokens_cumulative_over_stages(study):
    s, res = study
    runs, total = res["runs"], 0
    assert res["tokens_per_step"] == TOKENS_PER_STEP
    for size, steps in (("S", 6), ("2S", 4), ("4S", 4)):
        r = runs[f"tokenformer-{size}"]
        tokens = {f"model.{k}_tokens": res["sizes"][size]["tokenformer"][f"{k}_tokens"] for k in ("qkv", "proj", "ffn")}
        model = load_config(s.tokenformer, {**s.overrides, **tokens, "model.vocab_size": 1024}).model
        assert r["flops"] == flops_per_token(model) * steps * TOKENS_PER_STEP
        total += r["flops"]
        assert r["cumulative_flops"] == total
    assert runs["tokenformer-4S"]["cumulative_tokens"] == (6 + 4 + 4) * TOKENS_PER_STEP
    chain = [h for n in ("tokenformer-S", "tokenformer-2S", "tokenformer-4S") for h in runs[n]["history"]]
    assert [h["step"] for h in chain] == [2, 4, 6, 2, 4, 2, 4]
    assert all(b["flops"] > a["flops"] for a, b in zip(chain, chain[1:]))
    assert chain[-1]["flops"] == total
    for size, steps in (("S", 6), ("2S", 6), ("4S", 6), ("2S", 4), ("4S", 4)):
        name = f"transformer-{size}" + ("-same-tokens" if steps == 4 else "")
        r, shape = runs[name], {f"model.{k}": res["sizes"][size]["transformer"][k]
                                for k in ("hidden_size", "ffn_hidden_size")}
        model = load_config(s.transformer, {**s.overrides, "model.vocab_size": 1024, **shape}).model
        assert r["flops"] == r["cumulative_flops"] == flops_per_token(model) * steps * TOKENS_PER_STEP


def test_transformer_shapes():
    """width: the hidden size nearest a 4h-MLP Transformer of the count (multiples of 16 at 2 heads), the MLP making
    up the rest; mlp: the TokenFormer's width and depth, hence its FLOPs per token exactly."""
    tf = load_config("configs/debug.yaml", {**TINY, "model.vocab_size": 1024})
    tr = load_config("configs/transformer-debug.yaml", {**TINY, "model.vocab_size": 1024})
    width, mlp = plan_sizes(tf, tr, (1, 2, 4)), plan_sizes(tf, tr, (1, 2, 4), "mlp")
    assert [width[s]["transformer"]["hidden_size"] for s in width] == [32, 48, 80]
    assert [mlp[s]["transformer"]["hidden_size"] for s in mlp] == [32, 32, 32]
    assert width["S"]["transformer"]["ffn_hidden_size"] == mlp["S"]["transformer"]["ffn_hidden_size"] == 192
    for s in width:
        assert width[s]["tokenformer"] == mlp[s]["tokenformer"]
        assert width[s]["transformer"]["params"] / width[s]["tokenformer"]["params"] == pytest.approx(1, rel=0.01)
        assert mlp[s]["transformer"]["flops_per_token"] == mlp[s]["tokenformer"]["flops_per_token"]


def test_results_json_schema_and_plots(study):
    s, res = study
    with open(os.path.join(s.out, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert set(res) == {"study", "tokens_per_step", "sizes", "runs", "summary", "seconds"}
    assert set(res["runs"]) == {"tokenformer-S", "tokenformer-2S", "tokenformer-4S", "transformer-S", "transformer-2S",
                                "transformer-4S", "transformer-2S-same-tokens", "transformer-4S-same-tokens"}
    for name, r in res["runs"].items():
        grown = name in ("tokenformer-2S", "tokenformer-4S")
        assert set(r) == RUN_KEYS | ({"grown_from", "val_loss_before_growth", "val_loss_after_growth"} if grown
                                     else set()), name
        assert set(r["history"][-1]) == {"step", "loss", "lr", "val_loss", "tokens", "flops"}
        assert r["val_loss"] == r["history"][-1]["val_loss"] and 0 < r["val_loss"] < 8
    assert set(res["summary"]) == {"2S", "4S"} and all(set(v) == SUMMARY_KEYS for v in res["summary"].values())
    assert res["study"]["recipe"]["preset"] == "preserve" and res["study"]["recipe"]["tau"] == "pinned"
    paths = plot(res, s.out)
    assert [os.path.basename(p) for p in paths] == ["scaling_flops.png", "scaling_stages.png"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)


def test_flops_to_reach_interpolates_between_evaluations():
    rows = [{"flops": 10, "val_loss": 5.0}, {"flops": 20, "val_loss": 4.0}, {"flops": 40, "val_loss": 3.0}]
    assert flops_to_reach(rows, 3.5) == 30
    assert flops_to_reach(rows, 6.0) == 10
    assert flops_to_reach(rows, 2.9) is None


def test_tool_redraws_and_refuses_to_train_over_its_runs(study):
    s, _ = study
    os.remove(os.path.join(s.out, "scaling_flops.png"))
    tool = [sys.executable, str(REPO / "tools" / "reproduce_scaling.py"), "--out", s.out]
    p = subprocess.run(tool + ["--plot-only"], capture_output=True, text=True)
    assert p.returncode == 0 and os.path.exists(os.path.join(s.out, "scaling_flops.png")), p.stderr
    p = subprocess.run(tool, capture_output=True, text=True)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert "already holds runs (grown-2S, grown-4S, tokenformer-2S, tokenformer-4S, tokenformer-S" in p.stderr
