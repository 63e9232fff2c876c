"""Growth recipes (config.GrowthRecipe): what each setting does to the grown checkpoint, measured; the recipe in the
checkpoint's lineage; the trainer running the new stage's schedule it records."""
import dataclasses
import hashlib
import math

import pytest
import torch
import yaml

from tests.conftest import debug_overrides
from tests.runs import train
from tests.test_checkpoint import CFG, TOKENS, _logits, ckpt  # noqa: F401 (ckpt: the fixture)
from tokenformer_mp.checkpoint import load_tensors, model_config_of, read_manifest, write_layout_free
from tokenformer_mp.cli.inspect_checkpoint import main as inspect_main
from tokenformer_mp.cli.reshard import main as reshard_main
from tokenformer_mp.config import Config, GrowthRecipe
from tokenformer_mp.model import TokenFormer, pattention_kind
from tokenformer_mp.parallel.local import run_ranks
from tokenformer_mp.reshard import ExpandPlan, reshard
from tokenformer_mp.trainer import Schedule

GROW = {"qkv": 60, "proj": 36, "ffn": 140}  # 2x CFG's tokens


def _grow(src: str, out: str, recipe: GrowthRecipe, tokens: dict = GROW) -> dict:
    return reshard(src, out, expand=ExpandPlan(tokens, recipe), progress=False)


def _rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_default_recipe_is_bit_identical_to_before(tmp_path):
    """The preserve recipe writes what the resharding tool wrote before recipes existed: the digest below is of the
    tensors grown by the code at commit bc2425b (same source tensors, seed 3)."""
    g = torch.Generator().manual_seed(5)
    src = {n: torch.randn(p.shape, generator=g) for n, p in TokenFormer(CFG).named_parameters()}
    write_layout_free(src, Config(model=CFG), str(tmp_path / "src"))
    m = _grow(str(tmp_path / "src"), str(tmp_path / "grown"), GrowthRecipe(seed=3), {"qkv": 45, "proj": 40, "ffn": 100})
    grown = load_tensors(str(tmp_path / "grown"))
    h = hashlib.sha256()
    for n in sorted(grown):
        h.update(n.encode())
        h.update(grown[n].contiguous().numpy().tobytes())
    assert h.hexdigest() == "2355cbf86a87b087dc568f80d41b6b27169f9f3c164e5d7a12b138163a4d6dde"
    assert (m["step"], m["grown_from"]) == (0, {"qkv": 30, "proj": 18, "ffn": 70})
    assert [m["model"][f"{k}_scale_tokens"] for k in ("qkv", "proj", "ffn")] == [30, 18, 70]


def test_recipe_is_recorded_in_the_lineage_and_read_back(ckpt, tmp_path, capsys):
    src, _ = ckpt
    recipe = GrowthRecipe(preset="reference", noise_std=0.01, seed=7, lr=1e-3, warmup_steps=5)
    _grow(src, str(tmp_path / "grown"), recipe)
    m = read_manifest(str(tmp_path / "grown"))
    want = {"preset": "reference", "key_init": "normal", "key_std": 0.02, "value_init": "normal",
            "value_std": 2.0 / 2 / math.sqrt(64), "noise_std": 0.01, "noise": "relative", "tau": "follow",
            "optimizer": "reset", "seed": 7, "lr": 1e-3, "min_lr": None, "warmup_steps": 5, "steps": None}
    assert m["growth"] == want and m["history"][-1]["recipe"] == want and m["history"][-1]["optimizer"] == "reset"
    # a later move to another layout keeps the record; a config restating the recipe resolves to it
    reshard(str(tmp_path / "grown"), str(tmp_path / "tp2"), tp=2, progress=False)
    assert read_manifest(str(tmp_path / "tp2"))["growth"] == want
    assert recipe.resolved(model_config_of(str(tmp_path / "grown"))) == want
    assert inspect_main([str(tmp_path / "tp2")]) == 0
    assert "growth recipe preset=reference key_init=normal key_std=0.02" in capsys.readouterr().out


def test_recipe_from_a_config_file_with_flags_over_it(ckpt, tmp_path):
    """--expand-config's growth section is the recipe; a flag overrides its key."""
    src, _ = ckpt
    cfg = tmp_path / "stage2.yaml"
    cfg.write_text(yaml.safe_dump({"model": {f"{k}_tokens": n for k, n in GROW.items()},
                                   "growth": {"preset": "reference", "noise_std": 0.05, "noise": "absolute"}}))
    assert reshard_main(["--load", src, "--save", str(tmp_path / "grown"), "--expand-config", str(cfg),
                         "--tau", "pinned", "--stage-steps", "100"]) == 0
    g = read_manifest(str(tmp_path / "grown"))["growth"]
    assert (g["preset"], g["key_init"], g["noise_std"], g["noise"], g["tau"], g["steps"]) == \
        ("reference", "normal", 0.05, "absolute", "pinned", 100)


@pytest.mark.parametrize("noise", ["relative", "absolute"])
def test_noise_moves_the_old_tokens_by_its_std(ckpt, tmp_path, noise):
    """Noise of std s on the old tokens: ||dW|| / (std(W) sqrt(N)) = s (relative) or ||dW|| / sqrt(N) = s (absolute),
    within 10% (the sampling error of a norm of N >= 18 x 64 = 1,152 draws is 1/sqrt(2N) < 2.1%). The logits move
    at first order in s: twice the noise (the same draws, doubled) moves them twice as far, within 5% (measured
    4.1 s relative change for this 2-layer model, 2.000x for 2s). Same seed, same noise; another seed, other noise."""
    src, _ = ckpt
    s = 1e-3
    old = load_tensors(src)
    _grow(src, str(tmp_path / "a"), GrowthRecipe(noise_std=s, noise=noise, seed=1))
    _grow(src, str(tmp_path / "b"), GrowthRecipe(noise_std=2 * s, noise=noise, seed=1))
    _grow(src, str(tmp_path / "c"), GrowthRecipe(noise_std=s, noise=noise, seed=1))
    _grow(src, str(tmp_path / "d"), GrowthRecipe(noise_std=s, noise=noise, seed=2))
    a, b, c, d = (load_tensors(str(tmp_path / x)) for x in "abcd")
    for name, w in old.items():
        n = w.shape[0]
        if pattention_kind(name) is None:
            assert torch.equal(a[name], w), name  # only parameter tokens get noise
            continue
        scale = w.std().item() * math.sqrt(w.numel()) if noise == "relative" else math.sqrt(w.numel())
        ratio = (a[name][:n] - w).norm().item() / scale
        assert 0.9 * s <= ratio <= 1.1 * s, (name, ratio)
        # the same draws, doubled, to fp32's rounding of w + noise (an ulp of |w| < 1: 1.2e-7)
        torch.testing.assert_close(b[name][:n] - w, 2 * (a[name][:n] - w), rtol=0, atol=1.2e-7)
        assert torch.equal(a[name], c[name]) and not torch.equal(a[name][:n], d[name][:n]), name
        if "key_tokens" in name:
            assert not a[name][n:].any(), name  # the preserve recipe's zero keys, noise or not
    base = _logits(src, TOKENS)
    da, db = (_rel_change(_logits(str(tmp_path / x), TOKENS), base) for x in "ab")
    assert 1e-4 < da and abs(db / da - 2) <= 0.1, (da, db)


def test_random_new_tokens_have_their_std_and_change_the_outputs(ckpt, tmp_path):
    """New keys N(0, key_std) and values N(0, value_std): each new block's std within 10% of the recipe's
    (>= 18 x 64 draws: 2.1% sampling error); random keys with tau pinned move the logits (measured: 112% relative
    change for this random model, against 5e-7 for zero keys)."""
    src, _ = ckpt
    _grow(src, str(tmp_path / "g"), GrowthRecipe(key_init="normal", key_std=0.05, value_std=0.3))
    old, grown = load_tensors(src), load_tensors(str(tmp_path / "g"))
    for name, w in old.items():
        if pattention_kind(name) is not None:
            std = grown[name][w.shape[0]:].std().item()
            want = 0.05 if "key_tokens" in name else 0.3
            assert abs(std - want) <= 0.1 * want, (name, std)
            assert torch.equal(grown[name][:w.shape[0]], w), name
    base = _logits(src, TOKENS)
    assert _rel_change(_logits(str(tmp_path / "g"), TOKENS), base) > 0.1
    _grow(src, str(tmp_path / "z"), GrowthRecipe())
    assert _rel_change(_logits(str(tmp_path / "z"), TOKENS), base) < 1e-5


def test_tau_following_n_is_the_old_model_at_the_new_tau(ckpt, tmp_path):
    """Zero new keys add nothing but, with tau following n, scale every score by sqrt(new n / old n): the grown model
    is exactly the old weights run at tau = sqrt(new n) (1e-6 of the logits' scale), and differs from the old model
    (measured: 23% relative change for 2x tokens)."""
    src, _ = ckpt
    _grow(src, str(tmp_path / "g"), GrowthRecipe(tau="follow"))
    grown = _logits(str(tmp_path / "g"), TOKENS)
    at_new_tau = TokenFormer(dataclasses.replace(CFG, **{f"{k}_scale_tokens": n for k, n in GROW.items()}))
    missing, unexpected = at_new_tau.load_state_dict(load_tensors(src), strict=False)
    assert not unexpected and all(k.endswith(".scale_tokens") for k in missing)  # tau: the buffer built above
    with torch.no_grad():
        expected = at_new_tau(TOKENS)
    assert ((grown - expected).abs().max() / expected.abs().max()).item() <= 1e-6
    assert _rel_change(grown, _logits(src, TOKENS)) > 0.1


def test_the_trainer_runs_the_new_stage_schedule_of_the_recipe(corpus, tmp_path):
    """Grown with a stage of lr 1e-3 -> 1e-4, 4 warmup steps, 8 steps (the debug config says 3e-3, 2, 6): the steps
    after growth use exactly the recipe's rates, the run's own checkpoints carry the recipe, its resume continues the
    same schedule; a config whose growth section contradicts the checkpoint is refused by the key's name."""
    run_ranks(1, train, debug_overrides(corpus, tmp_path / "run", **{"train.steps": 1}))
    grown = str(tmp_path / "grown")
    reshard(str(tmp_path / "run" / "checkpoints"), grown, progress=False,
            expand=ExpandPlan({"qkv": 256, "proj": 256, "ffn": 1024},
                              GrowthRecipe(lr=1e-3, min_lr=1e-4, warmup_steps=4, steps=8)))
    recipe = read_manifest(grown)["growth"]
    stage = Schedule(lr=1e-3, min_lr=1e-4, warmup_steps=4, steps=8)
    over = debug_overrides(corpus, tmp_path / "stage", **{
        "model.qkv_tokens": 256, "model.proj_tokens": 256, "model.ffn_tokens": 1024, "model.qkv_scale_tokens": 128,
        "model.proj_scale_tokens": 128, "model.ffn_scale_tokens": 512, "checkpoint.load": grown,
        "train.steps": 6, "train.exit_after_steps": 3})
    first = run_ranks(1, train, over)[0]
    assert [h["lr"] for h in first] == pytest.approx([2.5e-4, 5e-4, 7.5e-4], rel=1e-12)
    assert read_manifest(str(tmp_path / "stage" / "checkpoints" / "global_step3"))["growth"] == recipe
    rest = run_ranks(1, train, over)[0]  # its own checkpoint first: steps 4-6 of the same stage
    assert [h["lr"] for h in rest] == pytest.approx([stage.lr_at(s) for s in (3, 4, 5)], rel=1e-12)
    assert rest[-1]["lr"] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    with pytest.raises(RuntimeError, match=r"growth\.lr: 0\.002 in the config, but .*grown with 0\.001"):
        run_ranks(1, train, {**over, "run_dir": str(tmp_path / "other"), "growth.lr": 2e-3})
