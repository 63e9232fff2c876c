"""Layout-free checkpoints: reshard round trips, function-preserving expansion, import/export, crash safety."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, debug_overrides
from tokenformer_mp.parallel.local import run_ranks
from tests.runs import evaluate_after_load, train
from tokenformer_mp.checkpoint import (FORMAT, CheckpointError, load_weights, model_config_of, read_latest,
                                       read_manifest, verify, write_layout_free)
from tokenformer_mp.config import Config, GrowthRecipe, ModelConfig
from tokenformer_mp.convert import (export_neox, export_safetensors, import_neox, model_config_from_neox,
                                    ours_to_neox, tokenizer_from_neox)
from tokenformer_mp.inference import load_model
from tokenformer_mp.model import TokenFormer
from tokenformer_mp.reshard import ExpandPlan, reshard
from tools.convert_checkpoint import main

CFG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=30, proj_tokens=18, ffn_tokens=70,
                  seq_length=32, vocab_size=256)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = TokenFormer(CFG)
    write_layout_free(dict(model.named_parameters()), Config(model=CFG), str(tmp_path / "src"))
    return str(tmp_path / "src"), model


def _logits(path, tokens):
    model = TokenFormer(model_config_of(path))
    load_weights(model, path)
    with torch.no_grad():
        return model(tokens)


TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def _content(path) -> dict:
    """Every tensor's bytes, by their block checksums: equal for two checkpoints written tensor by tensor (offline)
    exactly when every tensor is bit-identical."""
    return {n: {k: [b for seg in segs for b in seg["blocks"]] for k, segs in e["segments"].items()}
            for n, e in read_manifest(str(path))["tensors"].items()}


def test_round_trip_through_layouts_is_bit_identical(ckpt, tmp_path):
    src, _ = ckpt
    path = src
    for i, (tp, pp) in enumerate([(2, 1), (4, 2), (1, 2), (1, 1)]):
        out = str(tmp_path / f"hop{i}")
        reshard(path, out, tp=tp, pp=pp, progress=False)
        assert read_manifest(out)["config"]["parallel"]["tp"] == tp
        path = out
    assert _content(src) == _content(path)
    verify(path)


def test_tp8_pp4_round_trip(tmp_path):
    """The largest layouts the tool promises (TP=8, PP=4), uneven token shards (30/18/70 over 8), and back."""
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_heads=8, qkv_tokens=30, proj_tokens=18, ffn_tokens=70,
                      seq_length=32, vocab_size=256)
    write_layout_free(dict(TokenFormer(cfg).named_parameters()), Config(model=cfg), str(tmp_path / "src"))
    reshard(str(tmp_path / "src"), str(tmp_path / "big"), tp=8, pp=4, progress=False)
    assert read_manifest(str(tmp_path / "big"))["config"]["parallel"] == {
        "tp": 8, "pp": 4, "cp": 1, "zero_stage": 1, "sequence_parallel": False, "overlap_grad_reduce": False,
        "grad_bucket_size": None, "timeout_s": 600, "grad_reduce_dtype": "fp32"}
    reshard(str(tmp_path / "big"), str(tmp_path / "back"), tp=1, pp=1, progress=False)
    assert _content(tmp_path / "src") == _content(tmp_path / "back")
    with pytest.raises(CheckpointError, match="parallel.tp"):  # 16 does not divide 8 heads
        reshard(str(tmp_path / "src"), str(tmp_path / "bad"), tp=16, progress=False)


@pytest.mark.parametrize("plan", [
    ExpandPlan({"qkv": 120, "proj": 72, "ffn": 280}),  # 4x
    ExpandPlan({"qkv": 31, "proj": 18, "ffn": 77}),  # uneven growth, one kind unchanged
])
def test_expansion_with_zero_keys_preserves_the_function(ckpt, tmp_path, plan):
    src, _ = ckpt
    out = str(tmp_path / "grown")
    reshard(src, out, tp=2, expand=plan, progress=False)
    m = read_manifest(out)["model"]
    assert (m["qkv_tokens"], m["qkv_scale_tokens"], m["ffn_scale_tokens"]) == (plan.tokens["qkv"], 30, 70)
    before, after = _logits(src, TOKENS), _logits(out, TOKENS)
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-6


def test_random_key_growth_changes_the_function(ckpt, tmp_path):
    src, _ = ckpt
    out = str(tmp_path / "grown")
    reshard(src, out, expand=ExpandPlan({"qkv": 60, "proj": 36, "ffn": 140}, GrowthRecipe(key_init="normal")), progress=False)
    assert not torch.allclose(_logits(src, TOKENS), _logits(out, TOKENS), atol=1e-4)


def test_shrinking_is_refused_unless_asked(ckpt, tmp_path):
    src, _ = ckpt
    with pytest.raises(CheckpointError, match="qkv_tokens: 20 < 30 would drop trained tokens"):
        reshard(src, str(tmp_path / "s"), expand=ExpandPlan({"qkv": 20, "proj": 18, "ffn": 70}), progress=False)
    assert not os.path.exists(tmp_path / "s")
    reshard(src, str(tmp_path / "s"), expand=ExpandPlan({"qkv": 20, "proj": 18, "ffn": 70}, allow_shrink=True),
            progress=False)
    assert read_manifest(str(tmp_path / "s"))["tensors"]["layers.0.attention.query.key_tokens"]["shape"] == [20, 64]


def test_impossible_layout_is_refused_before_writing(ckpt, tmp_path):
    src, _ = ckpt
    with pytest.raises(CheckpointError, match="parallel.tp: tp=3 does not divide model.num_heads=4"):
        reshard(src, str(tmp_path / "x"), tp=3, progress=False)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.partial")


def test_corruption_and_mismatch_are_named(ckpt, tmp_path):
    src, _ = ckpt
    f = os.path.join(src, "tensors", "final_norm.bias.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="final_norm.bias"):
        verify(src)
    other = TokenFormer(ModelConfig(**{**CFG.__dict__, "qkv_tokens": 31}))
    with pytest.raises(CheckpointError, match=r"layers.0.attention.query.key_tokens: checkpoint \[30, 64\] vs model \[31, 64\]"):
        load_weights(other, src)


def test_import_official_layout_and_export(ckpt, tmp_path):
    """A state dict in the reference's GPT-NeoX pipeline names imports to the same function; export round trips; the
    official layout round trips bitwise: import -> export-neox -> import gives the same tensor files."""
    _, model = ckpt
    sd = {ours_to_neox(name, CFG.num_layers): p.detach() for name, p in model.named_parameters()}
    assert torch.equal(sd["sequential.2.mlp.key_param_tokens"], model.layers[0].ffn.key_tokens)  # the reference's names
    assert f"sequential.{CFG.num_layers + 3}.norm.bias" in sd and "sequential.0.word_embeddings.weight" in sd
    sd["sequential.2.attention.rotary_emb.inv_freq"] = torch.ones(4)  # buffers are recomputed, not imported
    import_neox(sd, CFG, str(tmp_path / "imported"))
    with torch.no_grad():
        expected = model(TOKENS)
    torch.testing.assert_close(_logits(str(tmp_path / "imported"), TOKENS), expected, rtol=0, atol=0)
    export_safetensors(str(tmp_path / "imported"), str(tmp_path / "export"))
    exported, _ = load_model(str(tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(exported(TOKENS), expected, rtol=0, atol=0)

    assert main(["export-neox", "--load", str(tmp_path / "imported"), "--save", str(tmp_path / "neox")]) == 0
    back = torch.load(tmp_path / "neox" / "pytorch_model.bin", weights_only=True)
    assert sorted(back) == sorted(k for k in sd if "inv_freq" not in k)
    assert all(torch.equal(back[k], sd[k]) for k in back)
    assert main(["import-neox", "--state-dict", str(tmp_path / "neox" / "pytorch_model.bin"), "--neox-config",
                 str(tmp_path / "neox" / "config.yml"), "--save", str(tmp_path / "again")]) == 0
    assert _content(tmp_path / "imported") == _content(tmp_path / "again")
    assert read_manifest(str(tmp_path / "imported"))["model"] == read_manifest(str(tmp_path / "again"))["model"]
    sd["sequential.99.mystery"] = torch.zeros(1)
    with pytest.raises(ValueError, match="sequential.99.mystery"):
        import_neox(sd, CFG, str(tmp_path / "bad"))


# The fields of the reference's own 150M_train_pile.yml, from its repository (JSON with comments, as it ships).
NEOX_YML = """{
  "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
  "qkv_slot_num": 30, "proj_slot_num": 18, "ffn_slot_num": 70,
  "seq_length": 32, "max_position_embeddings": 32,
  "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": false,
  "norm": "layernorm_nonparam", "final_norm": "layernorm", "gpt_j_residual": false,
  "norm_activation_type": "l2_norm_gelu", # "l2_norm_gelu", "gelu_l2_norm", "softmax"
  "tokenizer-type": "HFTokenizer",
}"""


def test_neox_config_fields_are_honoured_or_refused_by_name(tmp_path):
    import yaml
    base = yaml.safe_load(NEOX_YML)
    sd = {"sequential.0.word_embeddings.weight": torch.zeros(256, 64)}
    cfg = model_config_from_neox(base, sd)
    assert (cfg.vocab_size, cfg.rotary_pct, cfg.rotary_base, cfg.layernorm_eps) == (256, 0.25, 10000.0, 1e-5)
    honoured = model_config_from_neox({**base, "layernorm_epsilon": 1e-3, "rotary_emb_base": 500, "rotary-pct": 0.5,
                                       "padded_vocab_size": 512}, sd)
    assert (honoured.layernorm_eps, honoured.rotary_base, honoured.rotary_pct, honoured.vocab_size) == (1e-3, 500, 0.5,
                                                                                                          512)
    no_pct = {k: v for k, v in base.items() if k != "rotary_pct"}
    assert model_config_from_neox(no_pct, sd).rotary_pct == 1.0  # GPT-NeoX's default, not ours
    with pytest.raises(ValueError, match=r"pos_emb: 'alibi', only 'rotary' imports"):
        model_config_from_neox({**base, "pos_emb": "alibi"}, sd)
    with pytest.raises(ValueError, match=r"pos_emb: 'learned' \(the default when absent\)"):
        model_config_from_neox({k: v for k, v in base.items() if k != "pos_emb"}, sd)
    with pytest.raises(ValueError, match=r"norm: 'layernorm', only 'layernorm_nonparam'"):
        model_config_from_neox({**base, "norm": "layernorm"}, sd)
    with pytest.raises(ValueError, match="padded_vocab_size: missing"):
        model_config_from_neox(base)
    assert tokenizer_from_neox(base) == {}  # "tokenizer-type" but no vocab file
    assert tokenizer_from_neox({**base, "vocab-file": "./tokenizer.json"}) == {"tokenizer_type": "HFTokenizer",
                                                                                "tokenizer_model": "./tokenizer.json"}
    with pytest.raises(ValueError, match="tokenizer_type 'GPT2BPETokenizer'"):
        tokenizer_from_neox({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "gpt2.json"})
    with pytest.raises(ValueError, match="model.rotary_pct"):  # our own validation: int(16 * 0.2) rotary dims is odd
        model_config_from_neox({**base, "rotary_pct": 0.2}, sd)
    # imported, the honoured fields reach the model: its function is the one they define, not the defaults'
    torch.manual_seed(0)
    ref = TokenFormer(honoured).eval()
    sd = {ours_to_neox(n, 2): p.detach() for n, p in ref.named_parameters()}
    fields = {**base, "layernorm_epsilon": 1e-3, "rotary_emb_base": 500, "rotary-pct": 0.5}
    import_neox(sd, model_config_from_neox(fields, sd), str(tmp_path / "imported"))
    x = TOKENS % 256
    with torch.no_grad():
        torch.testing.assert_close(_logits(str(tmp_path / "imported"), x), ref(x), rtol=0, atol=0)
        default = TokenFormer(ModelConfig(**{**honoured.__dict__, "layernorm_eps": 1e-5, "rotary_base": 10000.0}))
        default.load_state_dict(ref.state_dict())
        assert not torch.allclose(default.eval()(x), ref(x), atol=1e-4)


def test_grown_checkpoint_is_refused_by_export_neox(ckpt, tmp_path):
    src, _ = ckpt
    reshard(src, str(tmp_path / "grown"), expand=ExpandPlan({"qkv": 31, "proj": 18, "ffn": 77}), progress=False)
    with pytest.raises(ValueError, match=r"grown checkpoint \(qkv_scale_tokens=30 with qkv_tokens=31, ffn_scale_"
                                         r"tokens=70 with ffn_tokens=77\).*tau = sqrt\(current token count\)"):
        export_neox(str(tmp_path / "grown"), str(tmp_path / "neox"))
    assert not os.path.exists(tmp_path / "neox") and not os.path.exists(tmp_path / "neox.partial")
    assert main(["export-neox", "--load", str(tmp_path / "grown"), "--save", str(tmp_path / "neox")]) == 2


def _grown_2x(path: str) -> dict:
    """Overrides for the debug config grown 2x (tau pinned) and loaded from path."""
    return {"model.qkv_tokens": 256, "model.proj_tokens": 256, "model.ffn_tokens": 1024,
            "model.qkv_scale_tokens": 128, "model.proj_scale_tokens": 128, "model.ffn_scale_tokens": 512,
            "checkpoint.load": path}


def test_trained_checkpoint_grows_and_reshards_without_changing_validation_loss(corpus, tmp_path):
    """Train at TP=1, grow 2x with zero keys into TP=2: the validation loss at the new layout is unchanged."""
    kw = {"train.steps": 4, "train.eval_interval": 4, "train.eval_iters": 2}
    hist = run_ranks(1, train, debug_overrides(corpus, tmp_path / "run", **kw))[0]
    src = str(tmp_path / "run" / "checkpoints")
    out = str(tmp_path / "grown")
    reshard(src, out, tp=2, expand=ExpandPlan({"qkv": 256, "proj": 256, "ffn": 1024}), progress=False)
    val = run_ranks(2, evaluate_after_load, debug_overrides(corpus, tmp_path / "run2", **kw, **_grown_2x(out),
                                                            **{"parallel.tp": 2}))[0]
    assert abs(val - hist[-1]["val_loss"]) <= 1e-6 * hist[-1]["val_loss"], (val, hist[-1]["val_loss"])
    # the tools read it too
    res = subprocess.run([sys.executable, "tools/evaluate.py", "--load", out, "--data", corpus["prefix"],
                          "--max-docs", "20"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["ppl"] > 1
    texts = [subprocess.run([sys.executable, "tools/generate.py", "--load", out, "--prompt", "The", "--temperature", "0",
                             "--max-new-tokens", "12", *flag], capture_output=True, text=True, cwd=REPO)
             for flag in ([], ["--no-kv-cache"])]
    assert all(r.returncode == 0 for r in texts), [r.stderr[-500:] for r in texts]
    assert texts[0].stdout == texts[1].stdout and len(texts[0].stdout) > len("The\n")


@pytest.mark.parametrize("async_save", [False, True])
def test_kill_during_training_leaves_a_loadable_checkpoint(corpus, tmp_path, async_save):
    """kill -9 at an arbitrary moment (saves every step, written in the background or not): 'latest' names a
    complete, verified checkpoint."""
    from tests.test_training import _args
    run = tmp_path / "run"
    args = _args(debug_overrides(corpus, run, **{"train.steps": 200, "checkpoint.save_interval": 1,
                                                   "checkpoint.async_save": async_save}))
    proc = subprocess.Popen([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and read_latest(str(run / "checkpoints")) in (None, "global_step1", "global_step2"):
        time.sleep(0.2)
    time.sleep(0.37)  # somewhere inside a later step or save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tag = read_latest(str(run / "checkpoints"))
    assert tag is not None and int(tag[11:]) >= 3
    verify(str(run / "checkpoints" / tag))
    hist = run_ranks(1, train, debug_overrides(corpus, run, **{"train.steps": int(tag[11:]) + 2}))[0]
    assert [h["step"] for h in hist] == [int(tag[11:]) + 1, int(tag[11:]) + 2]


def test_unpinned_growth_lets_tau_follow_n(ckpt, tmp_path):
    """--no-pin-tau: the reference's growth; even zero keys then change the function (tau grew)."""
    src, _ = ckpt
    out = str(tmp_path / "grown")
    reshard(src, out, expand=ExpandPlan({"qkv": 60, "proj": 36, "ffn": 140}, GrowthRecipe(tau="follow")), progress=False)
    m = read_manifest(out)["model"]
    assert m["qkv_scale_tokens"] is None and model_config_of(out).scale_tokens("qkv") == 60
    assert not torch.allclose(_logits(src, TOKENS), _logits(out, TOKENS), atol=1e-4)


def _same_steps(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= rel * x["loss"], (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= rel * x["grad_norm"], (x["step"], x["grad_norm"], y["grad_norm"])


def test_old_tokens_frozen_or_slowed_after_growth(corpus, tmp_path):
    """train.old_tokens_lr_mult after growth: 0 keeps every old key/value token bit-identical while new ones learn,
    at TP=2 x PP=2 as in one process; 0.5 moves old tokens half as far as 1 in the first step (new ones the same),
    and under ZeRO-1 with DP=2 (partitions cut through the tensors) as in one process."""
    from tokenformer_mp.checkpoint import load_tensors
    from tokenformer_mp.model import pattention_kind

    run_ranks(1, train, debug_overrides(corpus, tmp_path / "run", **{"train.steps": 2}))
    grown = str(tmp_path / "grown")
    reshard(str(tmp_path / "run" / "checkpoints"), grown, expand=ExpandPlan({"qkv": 256, "proj": 256, "ffn": 1024}),
            progress=False)
    old_n = {"qkv": 128, "proj": 128, "ffn": 512}
    assert read_manifest(grown)["grown_from"] == old_n

    def cont(world, mult, name, steps=2, **extra):
        run = tmp_path / name
        hist = run_ranks(world, train, debug_overrides(corpus, run, **_grown_2x(grown), **extra, **{
            "train.steps": 3, "train.exit_after_steps": steps, "train.old_tokens_lr_mult": mult}))[0]
        lf = str(run / "checkpoints" / f"global_step{steps}")
        assert read_manifest(lf)["grown_from"] == old_n  # carried on: a resume keeps treating them as old
        return hist, load_tensors(lf)

    start = load_tensors(grown)
    pattentions = [(n, old_n[pattention_kind(n)[0]]) for n in start if pattention_kind(n)]
    h1, frozen = cont(1, 0.0, "frozen1")
    h4, frozen4 = cont(4, 0.0, "frozen4", **{"parallel.tp": 2, "parallel.pp": 2})
    for n, k in pattentions:
        assert torch.equal(frozen[n][:k], start[n][:k]) and torch.equal(frozen4[n][:k], start[n][:k]), n
        assert not torch.equal(frozen[n][k:], start[n][k:]), n
    _same_steps(h1, h4)

    _, full = cont(1, 1.0, "full", steps=1)
    _, half = cont(1, 0.5, "half", steps=1)
    for n, k in pattentions:
        torch.testing.assert_close(half[n][:k] - start[n][:k], 0.5 * (full[n][:k] - start[n][:k]), rtol=0, atol=1e-7)
        torch.testing.assert_close(half[n][k:], full[n][k:], rtol=0, atol=0)
    hh1, _ = cont(1, 0.5, "half1")
    hh2, _ = cont(2, 0.5, "half_dp2", **{"train.micro_batch_size": 1})  # DP=2 x 1 = the same global batch
    _same_steps(hh1, hh2)


def test_old_tokens_rule_without_growth_is_a_clear_error(corpus, saved_run, tmp_path):
    from tests.test_training import _args
    args = _args(debug_overrides(corpus, tmp_path / "run2", **{
        "train.steps": 5, "train.old_tokens_lr_mult": 0, "checkpoint.load": str(saved_run[0] / "checkpoints")}))
    res = subprocess.run([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "train.old_tokens_lr_mult=0.0" in res.stderr and "grown_from" in res.stderr, res.stderr


# --- training checkpoints: completion records, pruning by save order, resume from the newest intact one ----------

@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory):
    """4 steps saved at every step with checkpoint.keep_last 0 (keep all) and eval_interval 0; the history."""
    run = tmp_path_factory.mktemp("saved") / "run"
    hist = run_ranks(1, train, debug_overrides(corpus, run, **{
        "train.steps": 4, "checkpoint.save_interval": 1, "checkpoint.keep_last": 0}))[0]
    return run, hist


def _copy_run(saved_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run[0], run)
    return run


def _flip(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_zero_means_keep_all_and_never_validate(saved_run):
    """checkpoint.keep_last 0 keeps every checkpoint; train.eval_interval 0 never validates; each is complete."""
    from tokenformer_mp.checkpoint import scan
    run, hist = saved_run
    complete, partial = scan(str(run / "checkpoints"))
    assert [(seq, tag) for seq, tag, _ in complete] == [(s, f"global_step{s}") for s in (1, 2, 3, 4)] and not partial
    assert not any("val_loss" in h for h in hist)


def test_save_interval_zero_saves_only_at_the_end(corpus, tmp_path):
    run_ranks(1, train, debug_overrides(corpus, tmp_path, **{"train.steps": 3, "checkpoint.save_interval": 0}))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("global_step*")) == ["global_step3"]


def test_pruning_goes_by_save_order_and_completion(tmp_path, caplog):
    """keep_last 1 after a restart from scratch (latest lost): the new checkpoint is kept although older ones have
    higher step numbers; a half-written directory (no manifest: the completion record) is removed, naming it;
    `latest` is kept."""
    import logging
    from tokenformer_mp.checkpoint import FORMAT, MANIFEST, prune, write_atomic
    ckpt = tmp_path / "checkpoints"
    for seq, step in ((1, 15), (2, 18), (3, 4)):
        (ckpt / f"global_step{step}").mkdir(parents=True)
        write_atomic(str(ckpt / f"global_step{step}" / MANIFEST),
                     json.dumps({"format": FORMAT, "seq": seq, "tensors": {}, "files": {}}))
    (ckpt / "global_step20" / "shards").mkdir(parents=True)
    (ckpt / "global_step20" / "shards" / "rank00000.safetensors").write_bytes(b"half")
    (ckpt / "latest").write_text("global_step4")
    with caplog.at_level(logging.WARNING, logger="tokenformer_mp"):
        prune(str(ckpt), keep_last=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step4", "latest"]
    assert f"removing {ckpt / 'global_step20'}: no manifest.json (a save that did not finish)" in caplog.text


def _shard(tag_dir) -> Path:
    return Path(tag_dir) / "shards" / "rank00000.safetensors"


def _resume_under_damage(overrides: dict, root: str, variants: list[str]) -> list[tuple[object, str]]:
    """On each rank of a world: for each variant, a copy of root's checkpoints damaged so, loaded by the trainer:
    (the step it resumed at, or "error", and what it logged or raised)."""
    import logging
    import torch.distributed as dist

    from tokenformer_mp.config import load_config
    from tokenformer_mp.engine_checkpoint import load_checkpoint
    from tokenformer_mp.trainer import Trainer, shutdown
    trainer = Trainer(load_config("configs/debug.yaml", overrides))
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("tokenformer_mp").addHandler(handler)
    out = []
    for i, variant in enumerate(variants):
        ckpt = f"{root}/v{i}"
        if dist.get_rank() == 0:
            shutil.copytree(f"{root}/checkpoints", ckpt)
            latest = os.path.join(ckpt, "latest")
            if variant == "garbage":
                open(latest, "wb").write(b"\x00\xff\xfe garbage")
            elif variant == "empty":
                open(latest, "w").close()
            elif variant == "missing":
                os.remove(latest)
            elif variant == "names_missing":
                open(latest, "w").write("global_step9")
            elif variant == "incomplete":
                os.remove(os.path.join(ckpt, "global_step4", "manifest.json"))
            elif variant in ("flip_shard", "all_corrupt"):
                for s in (4,) if variant == "flip_shard" else (1, 2, 3, 4):
                    path = _shard(f"{ckpt}/global_step{s}")
                    _flip(path, offset=path.stat().st_size // 2)
        dist.barrier()
        records.clear()
        try:
            out.append((load_checkpoint(trainer.live, ckpt).manifest["step"], " | ".join(records)))
        except CheckpointError as e:
            out.append(("error", str(e)))
    shutdown()
    return out


def test_resume_falls_back_to_the_newest_intact_checkpoint(corpus, saved_run, tmp_path):
    """A bad, empty or missing `latest`, one naming a missing or incomplete checkpoint, a flipped byte in a shard:
    both ranks (DP=2, each reading its own partition of the optimizer state) agree on the newest intact checkpoint and
    the log says why; none intact: one error naming the directory and each problem."""
    shutil.copytree(saved_run[0] / "checkpoints", tmp_path / "checkpoints")
    variants = ["none", "garbage", "empty", "missing", "names_missing", "incomplete", "flip_shard", "all_corrupt"]
    overrides = debug_overrides(corpus, tmp_path / "run", **{"train.micro_batch_size": 1})
    ranks = run_ranks(2, _resume_under_damage, overrides, str(tmp_path), variants)
    assert [step for step, _ in ranks[0]] == [step for step, _ in ranks[1]]
    got = dict(zip(variants, ranks[0]))
    c = tmp_path
    expected = {
        "none": (4, ""),
        "garbage": (4, f"{c}/v1/latest holds "),
        "empty": (4, f"{c}/v2/latest is empty"),
        "missing": (4, f"{c}/v3/latest is missing"),
        "names_missing": (4, f"{c}/v4/latest names global_step9, which does not exist"),
        "incomplete": (3, f"{c}/v5/latest names global_step4, which has no valid manifest.json"),
        "flip_shard": (3, f"{c}/v6/global_step4: rank "),
        "all_corrupt": ("error", f"{c}/v7: no intact complete checkpoint to resume from"),
    }
    for variant, (step, message) in expected.items():
        assert got[variant][0] == step and message in got[variant][1], (variant, got[variant])
    assert f"{_shard(f'{c}/v6/global_step4')}: tensor " in got["flip_shard"][1]
    assert "checksum mismatch" in got["flip_shard"][1]
    assert "resuming from the newest intact checkpoint" in got["flip_shard"][1]
    assert all(f"{c}/v7/global_step{s}: rank " in got["all_corrupt"][1] for s in (1, 2, 3, 4))


def test_flipped_byte_in_a_shard_resumes_from_the_previous_checkpoint_exactly(corpus, saved_run, tmp_path):
    """The trainer's own resume: global_step4's shard corrupted -> it says so, continues from global_step3, and step
    4 again equals the first run's step 4 bit for bit; the step-4 checkpoint it saves is whole."""
    from tests.test_training import _args
    run = _copy_run(saved_run, tmp_path)
    shard = _shard(run / "checkpoints" / "global_step4")
    _flip(shard, offset=shard.stat().st_size // 2)
    res = subprocess.run([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml",
                          *_args(debug_overrides(corpus, run, **{"train.steps": 5, "checkpoint.save_interval": 1}))],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{run}/checkpoints/global_step4: rank 0: {shard}: tensor " in res.stdout, res.stdout[-3000:]
    assert f"resuming from the newest intact checkpoint, {run}/checkpoints/global_step3" in res.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5]
    assert rows[4]["loss"] == saved_run[1][3]["loss"] and rows[4]["grad_norm"] == saved_run[1][3]["grad_norm"]
    verify(str(run / "checkpoints" / "global_step4"))


def test_kill_9_in_a_save_then_sigterm_with_keep_last_1_leaves_a_complete_checkpoint(corpus, tmp_path):
    """The sequence that once left no complete checkpoint (keep_last 1): a kill -9 while saving, a restart stopped
    by SIGTERM, a start again. The kill lands at an arbitrary moment, so the half-written directory a kill inside a
    save leaves is also planted, for a later step (it sorts above the complete ones, as step 20 above 15 and 18)."""
    from tests.test_training import _args
    from tokenformer_mp.checkpoint import scan

    run, step_of = tmp_path / "run", lambda: int((read_latest(str(tmp_path / "run" / "checkpoints")) or "0")[11:] or 0)
    cmd = [sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *_args(debug_overrides(
        corpus, run, **{"train.steps": 200, "checkpoint.save_interval": 1, "checkpoint.keep_last": 1}))]

    def start_and_wait_past(step: int) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and step_of() <= step and proc.poll() is None:
            time.sleep(0.1)
        assert step_of() > step, "no checkpoint saved in time"
        return proc

    proc = start_and_wait_past(1)
    time.sleep(0.37)  # somewhere inside a later step or save
    proc.kill()
    proc.wait()
    killed = step_of()
    half = run / "checkpoints" / f"global_step{killed + 50}"
    half.mkdir(exist_ok=True)
    shard = _shard(run / "checkpoints" / f"global_step{killed}")
    (half / "shards").mkdir(exist_ok=True)
    (half / "shards" / shard.name).write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    proc = start_and_wait_past(killed)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 124
    complete, partial = scan(str(run / "checkpoints"))
    stopped = step_of()
    assert stopped > killed and [tag for _, tag, _ in complete] == [f"global_step{stopped}"] and not partial
    hist = run_ranks(1, train, debug_overrides(corpus, run, **{"train.steps": stopped + 1}))[0]
    assert [h["step"] for h in hist] == [stopped + 1]


def _save_with_nan(overrides: dict) -> list[str]:
    """A NaN in the model's copy of a parameter on rank 1, then (that one repaired) in ZeRO's fp32 partition (the
    master weights) on rank 0: what each save attempt says."""
    from tokenformer_mp.config import load_config
    from tokenformer_mp.trainer import Trainer, TrainingDiverged, shutdown
    trainer = Trainer(load_config("configs/debug.yaml", overrides))
    trainer.fit()  # one step, saved
    trainer.step += 1
    model_copy = dict(trainer.model.named_parameters())["layers.0.ffn.value_tokens"]
    master = trainer.optimizer.optimizer.param_groups[0]["params"][0]
    out = []
    for rank, tensor in ((1, model_copy), (0, master)):
        with torch.no_grad():
            old = tensor.view(-1)[7].item()
            if trainer.layout.rank == rank:
                tensor.view(-1)[7] = float("nan")
            try:
                trainer.save()
                out.append("saved")
            except TrainingDiverged as e:
                out.append(str(e))
            tensor.view(-1)[7] = old
    shutdown()
    return out


def test_nonfinite_state_is_never_saved(corpus, tmp_path):
    """A NaN in the rows one TP rank holds, in the model's copy or in ZeRO's fp32 master: both ranks refuse the save
    (agreed), `latest` and the last good checkpoint stay, and the message names it."""
    msgs = run_ranks(2, _save_with_nan, debug_overrides(corpus, tmp_path, **{"train.steps": 1, "parallel.tp": 2}))
    assert msgs[0] == msgs[1], msgs
    for rank, msg in zip((1, 0), msgs[0]):
        assert msg == (f"step 2: non-finite parameters or optimizer state on rank(s) [{rank}]; not saved. The last "
                       f"good checkpoint, {tmp_path}/checkpoints/global_step1 (step 1), is kept."), msg
    assert read_latest(str(tmp_path / "checkpoints")) == "global_step1"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("global_step*")) == ["global_step1"]


def _load_damaged(overrides: dict, paths: list[str]) -> list[str]:
    from tokenformer_mp.config import load_config
    from tokenformer_mp.engine_checkpoint import load_checkpoint
    from tokenformer_mp.trainer import Trainer, shutdown
    trainer = Trainer(load_config("configs/debug.yaml", overrides))
    out = []
    for path in paths:
        try:
            load_checkpoint(trainer.live, path)
            out.append("loaded")
        except CheckpointError as e:
            out.append(str(e))
    shutdown()
    return out


def test_trainer_refuses_a_damaged_layout_free_tensor(corpus, saved_run, tmp_path):
    """checkpoint.load of a layout-free checkpoint (the run's, resharded: a file per tensor) with a flipped byte, a
    truncated file or a flipped header byte: one error naming the tensor and the file (at TP=2, where each rank
    reads its rows)."""
    from tests.test_bad_inputs import damage
    paths = []
    for how in ("flip", "truncate", "header"):
        path = tmp_path / how
        reshard(str(saved_run[0] / "checkpoints"), str(path), tp=2, progress=False)
        damage(path / "tensors" / "layers.1.ffn.key_tokens.safetensors", how)
        paths.append(str(path))
    msgs = run_ranks(2, _load_damaged, debug_overrides(corpus, tmp_path / "run", **{"parallel.tp": 2}), paths)
    for path, msg, what in zip(paths, msgs[0], ("checksum mismatch in bytes", "the file is truncated",
                                                  "header checksum mismatch")):
        assert msg.startswith(f"{path}/tensors/layers.1.ffn.key_tokens.safetensors: tensor layers.1.ffn.key_tokens "
                              f"(weight): ") and what in msg, msg


def _inspect_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("inspect_tool", REPO / "tools" / "inspect_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_inspect_verify_reads_every_block(saved_run, tmp_path, capsys):
    """tools/inspect_checkpoint.py --verify checks every block of every shard of a training checkpoint."""
    tool = _inspect_tool()
    run = _copy_run(saved_run, tmp_path)
    assert tool.main([str(run / "checkpoints"), "--verify"]) == 0
    assert "checksums: all ok (" in capsys.readouterr().out
    shard = _shard(run / "checkpoints" / "global_step4")
    _flip(shard, offset=shard.stat().st_size - 10)  # the last bytes: the RNG state, read by a resume only
    assert tool.main([str(run / "checkpoints"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: rank 0's RNG state (torch): checksum mismatch" in err, err


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_inspect_verify_refuses_a_damaged_latest(saved_run, tmp_path, capsys, caplog, how):
    """--verify on a run's checkpoints/ whose `latest` (global_step4) lost its manifest fails naming it, where it
    once verified global_step3 instead and said all was ok; that one verifies by its own directory, and plain
    inspection still shows it (with the warning that training, evaluation and export give)."""
    tool, ckpts = _inspect_tool(), _copy_run(saved_run, tmp_path) / "checkpoints"
    manifest = ckpts / "global_step4" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100]) if how == "truncated" else manifest.unlink()
    capsys.readouterr()
    assert tool.main([str(ckpts), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert err == (f"error: {ckpts}: {ckpts}/latest names global_step4, which has no valid manifest.json (a save that "
                   f"did not finish, or one written before format {FORMAT}) (the newest complete one is global_step3: "
                   f"verify it by its directory)\n") and "checksums" not in out, (out, err)
    assert tool.main([str(ckpts / "global_step3"), "--verify"]) == 0
    assert "checksums: all ok (" in capsys.readouterr().out
    assert tool.main([str(ckpts)]) == 0
    assert capsys.readouterr().out.startswith(f"{ckpts}/global_step3\nformat {FORMAT}  step 3 ")
    assert "; reading the newest complete checkpoint, global_step3" in caplog.text


@pytest.mark.parametrize("world,layout", [(2, {}), (4, {"parallel.tp": 2})], ids=["dp2", "tp2_dp2"])
def test_every_rank_writes_and_reads_its_own_share(world, layout):
    """The checkpoint_io benchmark's counts: every element of the state (weights and both moments) written once,
    each rank's bytes within 1% of total / world (ZeRO's equal partitions), and a load at the same layout reading
    each rank's own share (its weight rows, its moments' fragments) within 1% (the headers)."""
    from tokenformer_mp.bench.checkpoint_io import measure
    from tokenformer_mp.config import load_config
    from tokenformer_mp.model import count_params
    overrides = {"model.seq_length": 64, "train.micro_batch_size": 1, "train.global_batch_size": None,
                 "train.grad_accum_steps": 1, "train.device": "cpu", "model.vocab_size": 4096, **layout}
    r = measure("configs/debug.yaml", world, overrides)
    assert r["elements_written"] == 3 * count_params(load_config("configs/debug.yaml", overrides).model)["params"]
    assert r["write_vs_ideal"] <= 0.01 and r["read_vs_ideal"] <= 0.01, r


def test_async_save_resumes_exactly(corpus, tmp_path):
    """checkpoint.async_save at DP=2: every checkpoint completes (latest moves at a later step boundary, the last at
    the end), and a run stopped and resumed from them equals the synchronous run that never stopped, bit for bit."""
    from tokenformer_mp.checkpoint import scan
    kw = {"train.steps": 4, "train.micro_batch_size": 1, "checkpoint.save_interval": 1, "checkpoint.keep_last": 0}
    ref = run_ranks(2, train, debug_overrides(corpus, tmp_path / "sync", **kw))[0]
    kw["checkpoint.async_save"] = True
    first = run_ranks(2, train, debug_overrides(corpus, tmp_path / "async", **kw, **{"train.exit_after_steps": 2}))[0]
    assert read_latest(str(tmp_path / "async" / "checkpoints")) == "global_step2"
    rest = run_ranks(2, train, debug_overrides(corpus, tmp_path / "async", **kw))[0]
    assert [h["step"] for h in first + rest] == [1, 2, 3, 4]
    assert [(h["loss"], h["grad_norm"]) for h in first + rest] == [(h["loss"], h["grad_norm"]) for h in ref]
    complete, partial = scan(str(tmp_path / "async" / "checkpoints"))
    assert [tag for _, tag, _ in complete] == [f"global_step{s}" for s in (1, 2, 3, 4)] and not partial
    assert read_latest(str(tmp_path / "async" / "checkpoints")) == "global_step4"


def _host_buffers_of_saves(overrides: dict) -> list:
    """Host buffers alive (and the saver's count of their bytes) after a synchronous save, while an async save is in
    flight, and after it is finished."""
    import gc
    import weakref

    from tokenformer_mp import engine_checkpoint as checkpoint
    from tokenformer_mp.config import load_config
    from tokenformer_mp.model import count_params
    from tokenformer_mp.trainer import Trainer, shutdown
    buffers, copy = [], checkpoint._host_copy

    def recorded(items):
        out = copy(items)
        buffers.extend(weakref.ref(t) for *_, t in out)
        return out

    checkpoint._host_copy = recorded
    cfg = load_config("configs/debug.yaml", overrides)
    trainer = Trainer(cfg)
    saver, out = trainer.saver, [count_params(cfg.model)["params"]]

    def alive():
        gc.collect()
        return sum(ref() is not None for ref in buffers), len(buffers), saver.host_bytes()

    trainer.fit()  # one step, saved synchronously at the end
    out.append(alive())
    saver.async_save, trainer.step = True, trainer.step + 1
    saver.save(trainer.step, trainer.run_record())
    out.append(alive())
    saver.finish()
    out.append(alive())
    shutdown()
    return out


def test_checkpoint_host_buffers_live_only_while_a_save_is_in_flight(corpus, tmp_path):
    """The host copy of a rank's state (12 bytes a parameter at DP=1: weights and Adam's two moments in fp32) is
    released when a synchronous save returns and when an async one is finalized, not kept for the next save."""
    params, after_sync, in_flight, after_async = run_ranks(1, _host_buffers_of_saves, debug_overrides(
        corpus, tmp_path, **{"train.steps": 1}))[0]
    n = in_flight[1] // 2  # buffers a save makes: both saves copy the same segments
    assert n > 0 and after_sync == (0, n, 0)
    assert in_flight == (n, 2 * n, 12 * params)
    assert after_async == (0, 2 * n, 0)
