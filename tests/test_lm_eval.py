"""tools/lm_eval.py (lm-eval over the project's inference) against lm-eval's own Hugging Face model on the export."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import NEOX, REPO
from tests.test_hf import DEBUG, _checkpoint
from tokenformer_mp.config import ModelConfig, load_config

TASKS = "tokenformer_tiny_choice,tokenformer_tiny_gen,tokenformer_tiny_text"  # tests/data/lm_eval: local data only
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _samples(out: str, task: str) -> dict[int, dict]:
    (path,) = glob.glob(os.path.join(out, "*", f"samples_{task}_*.jsonl"))
    with open(path) as f:
        return {s["doc_id"]: s for s in map(json.loads, f)}


def _results(out: str) -> dict:
    (path,) = glob.glob(os.path.join(out, "*", "results_*.json"))
    with open(path) as f:
        return json.load(f)["results"]


@pytest.mark.parametrize("arch", ["tokenformer", "transformer"])
def test_adapter_and_lm_eval_hf_on_the_export_agree(tmp_path, arch):
    """Multiple choice (loglikelihood), greedy generation (generate_until) and whole-text perplexity
    (loglikelihood_rolling, texts longer than the 128-token window) on the debug model, batched 4 on both sides.

    With the GPT-NeoX tokenizer.json, which the export ships as is: both sides decode any ids alike. (A SentencePiece
    model converted by the export does not, on ids that are not UTF-8: tokenizers' ByteFallback gives U+FFFD for every
    byte of an invalid run of byte pieces, SentencePiece for its invalid bytes only, and a random model's greedy
    text has such runs. tests/test_hf.py checks the converted ids and text on real text.)"""
    cfg = ModelConfig(**{**DEBUG.__dict__, "vocab_size": 50277})  # unpadded: random weights favour no phantom ids
    if arch == "transformer":  # the baseline of configs/transformer-debug.yaml
        cfg = ModelConfig(**{**load_config("configs/transformer-debug.yaml").model.__dict__, "vocab_size": 50277})
    _checkpoint(tmp_path / "ckpt", cfg, NEOX)
    from tokenformer_mp.hf.export import export_hf
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    common = ["--tasks", TASKS, "--log-samples"]
    ours = subprocess.run([sys.executable, "tools/lm_eval.py", "--load", str(tmp_path / "ckpt"), *common,
                           "--include-path", "tests/data/lm_eval", "--batch-size", "4",
                           "--output-path", str(tmp_path / "ours")], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "|tokenformer_tiny_choice|" in ours.stdout and "acc" in ours.stdout  # lm-eval's table
    theirs = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                             f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
                             "--tasks", TASKS, "--include_path", "tests/data/lm_eval", "--batch_size", "4",
                             "--log_samples", "--output_path", str(tmp_path / "theirs")],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    assert theirs.returncode == 0, theirs.stderr[-3000:]

    for task in ("tokenformer_tiny_choice", "tokenformer_tiny_text"):
        a, b = _samples(str(tmp_path / "ours"), task), _samples(str(tmp_path / "theirs"), task)
        assert sorted(a) == sorted(b) and len(a) == (20 if "choice" in task else 4)
        ll = lambda s: [float(r[0]) if isinstance(r, list) else float(r) for r in s["filtered_resps"]]  # noqa: E731
        for i in a:  # each log-likelihood within 1e-4 (measured: 3e-5 for 1,173 nats of text, 4e-6 per choice)
            diff = max(abs(x - y) for x, y in zip(ll(a[i]), ll(b[i]), strict=True))
            assert diff <= 1e-4, (task, i, ll(a[i]), ll(b[i]))
            if "choice" in task:  # greedy flags, and the per-example accuracy
                assert [r[1] for r in a[i]["filtered_resps"]] == [r[1] for r in b[i]["filtered_resps"]]
                assert (a[i]["acc"], a[i]["acc_norm"]) == (b[i]["acc"], b[i]["acc_norm"]), i
    a, b = _samples(str(tmp_path / "ours"), "tokenformer_tiny_gen"), _samples(str(tmp_path / "theirs"),
                                                                             "tokenformer_tiny_gen")
    assert {i: s["filtered_resps"] for i, s in a.items()} == {i: s["filtered_resps"] for i, s in b.items()}
    ra, rb = _results(str(tmp_path / "ours")), _results(str(tmp_path / "theirs"))
    for metric in ("acc,none", "acc_norm,none"):
        assert ra["tokenformer_tiny_choice"][metric] == rb["tokenformer_tiny_choice"][metric]
    bpb = ra["tokenformer_tiny_text"]["bits_per_byte,none"], rb["tokenformer_tiny_text"]["bits_per_byte,none"]
    assert abs(bpb[0] - bpb[1]) <= 1e-5 * bpb[1]


def test_unknown_task_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "tools/lm_eval.py", "--load", str(tmp_path), "--tasks", "no_such_task"],
                         cwd=REPO, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "--tasks: unknown no_such_task" in res.stderr, res.stderr[-2000:]

