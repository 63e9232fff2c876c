"""Config errors name the key; overrides go through the same validation."""
import re
import pytest

from tokenformer_mp.config import ConfigError, load_config, parse_overrides, validate


def test_overrides_are_typed_and_dotted():
    cfg = load_config("configs/tokenformer-150m.yaml", parse_overrides(["--train.steps", "20", "--train.lr=3e-4",
                                                                        "--parallel.tp", "2"]))
    assert cfg.train.steps == 20 and cfg.train.lr == 3e-4 and cfg.parallel.tp == 2


@pytest.mark.parametrize("overrides,message", [
    ({"model.hiden_size": 10}, "model.hiden_size: unknown key (did you mean model.hidden_size?)"),
    ({"trian.steps": 10}, "trian: unknown key"),
    ({"train.steps": "ten"}, "train.steps: expected an integer"),
    ({"train.activation_checkpointing": 1}, "train.activation_checkpointing: expected true/false"),
])
def test_structural_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/tokenformer-150m.yaml", overrides)


@pytest.mark.parametrize("overrides,key", [
    ({"model.num_heads": 7}, "model.num_heads"),
    ({"model.norm": "relu"}, "model.norm"),
    ({"parallel.tp": 5}, "parallel.tp"),  # 12 heads
    ({"parallel.pp": 13}, "parallel.pp"),  # 12 layers
    ({"parallel.pp": 2, "parallel.zero_stage": 2}, "parallel.zero_stage"),
    ({"parallel.zero_stage": 0}, "parallel.zero_stage"),
    ({"train.min_lr": 1.0}, "train.min_lr"),
    ({"train.fused_pattention": True, "model.norm": "softmax"}, "train.fused_pattention"),
    ({"parallel.tp": 4, "parallel.sequence_parallel": True, "model.seq_length": 2046}, "parallel.sequence_parallel"),
])
def test_meaning_errors_name_the_key(overrides, key):
    cfg = load_config("configs/tokenformer-150m.yaml", overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, check_paths=False)


def test_vocab_larger_than_embedding():
    cfg = load_config("configs/tokenformer-150m.yaml")
    with pytest.raises(ConfigError, match="model.vocab_size: the tokenizer has 60000 ids"):
        validate(cfg, check_paths=False, tokenizer_vocab=60000)


def test_layout_not_dividing_world():
    cfg = load_config("configs/tokenformer-150m.yaml", {"parallel.tp": 2, "parallel.pp": 2})
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        validate(cfg, check_paths=False, world_size=6)


def test_missing_data_and_tokenizer(tmp_path):
    cfg = load_config("configs/tokenformer-150m.yaml", {"data.prefixes": [str(tmp_path / "nope")]})
    with pytest.raises(ConfigError, match=r"data\.prefixes\[0\]: .*nope\.bin does not exist"):
        validate(cfg)
    (tmp_path / "d.bin").write_bytes(b""); (tmp_path / "d.idx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data\.prefixes\[0\]: .*d\.idx: not a megatron-core index"):
        validate(load_config("configs/tokenformer-150m.yaml", {"data.prefixes": [str(tmp_path / "d")]}))
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    builder.add_document(np.arange(10, dtype=np.uint16), [10])
    builder.finalize(str(tmp_path / "d.idx"))
    cfg = load_config("configs/tokenformer-150m.yaml", {"data.prefixes": [str(tmp_path / "d")],
                                                        "data.tokenizer_model": str(tmp_path / "tok.json")})
    with pytest.raises(ConfigError, match=r"data\.tokenizer_model"):
        validate(cfg)


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))


def test_global_batch_is_the_recipe_at_any_gpu_count():
    """tokenformer-150m states the paper's 1,024 sequences: 128 accumulation steps on one GPU, 16 on 8, 2 on 64."""
    t = load_config("configs/tokenformer-150m.yaml").train
    assert [(t.accum_steps(dp), t.global_batch(dp)) for dp in (1, 8, 64)] == [(128, 1024), (16, 1024), (2, 1024)]
    cfg = load_config("configs/tokenformer-150m.yaml", {"parallel.tp": 2})
    validate(cfg, check_paths=False, world_size=16)  # DP 8
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: 1024 sequences is not a multiple of "
                                          r"micro_batch_size 8 x data-parallel size 48 = 384"):
        validate(cfg, check_paths=False, world_size=96)
    both = load_config("configs/tokenformer-150m.yaml", {"train.grad_accum_steps": 4})
    with pytest.raises(ConfigError, match="train.global_batch_size and train.grad_accum_steps: set one of them"):
        validate(both, check_paths=False)
    debug = load_config("configs/debug.yaml").train  # accumulation steps given: the global batch grows with DP
    assert [debug.global_batch(dp) for dp in (1, 2)] == [16, 32]


def test_paper_configs_use_the_bundled_tokenizer():
    """Every paper config names the GPT-NeoX-20B tokenizer shipped in the repository (not a path beside a checkout),
    and it fits the configs' 50,304-row embedding."""
    import glob
    import os

    from tests.conftest import REPO, SHARED
    from tokenformer_mp.tokenizer import build_tokenizer
    paths = {load_config(c).data.tokenizer_model for c in glob.glob(str(REPO / "configs" / "tokenformer-*.yaml"))}
    assert paths == {"tokenizers/gpt-neox-20b/tokenizer.json"}
    tok = build_tokenizer("HFTokenizer", str(REPO / paths.pop()))
    assert (tok.vocab_size, tok.eod, tok.pad) == (50277, 0, 1)
    assert os.path.exists(REPO / "tokenizers" / "gpt-neox-20b" / "LICENSE")
    shared = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    if shared.exists():  # the same file the tests use
        assert shared.read_bytes() == (REPO / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").read_bytes()


def test_long_context_config_is_the_1_5b_at_32k_on_its_layout():
    """configs/tokenformer-1.5b-32k.yaml: tokenformer-1.5b's model at a 32,768-token context, on the layout its
    comment derives (CP=4, no recomputation, micro-batch 1, 64 sequences a step), valid on one or two 8-GPU nodes
    and refused where CP=4 does not divide the GPUs."""
    from dataclasses import replace

    long, base = load_config("configs/tokenformer-1.5b-32k.yaml"), load_config("configs/tokenformer-1.5b.yaml")
    assert long.model == replace(base.model, seq_length=32768)
    assert (long.parallel.cp, long.train.activation_checkpointing, long.train.micro_batch_size) == (4, False, 1)
    assert long.train.global_batch_size * long.model.seq_length == base.train.global_batch_size * base.model.seq_length
    for gpus in (8, 16):
        validate(long, check_paths=False, check_env=False, world_size=gpus)
        assert long.train.accum_steps(long.parallel.dp(gpus)) == 64 // (gpus // 4)
    with pytest.raises(ConfigError, match="tp\\*pp\\*cp = 1\\*1\\*4 does not divide the world size 6"):
        validate(long, check_paths=False, check_env=False, world_size=6)


def test_bf16_zero1_refuses_bucket_options_only_where_precision_is_bf16(monkeypatch, tmp_path):
    """DeepSpeed's ZeRO-1 in bf16 (BF16_Optimizer) ignores overlap_comm and reduce_bucket_size: refused where the
    precision is bf16, train.precision auto included on a GPU, accepted in fp32 and at ZeRO-2. No shipped config
    trips it on a GPU."""
    import glob

    import torch
    from tests.conftest import REPO

    def check(config="configs/tokenformer-150m.yaml", **overrides):
        validate(load_config(config, {"run_dir": str(tmp_path), **overrides}), check_paths=False, check_env=True)

    overlap = {"parallel.overlap_grad_reduce": True}
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        if gpu:
            with pytest.raises(ConfigError, match=r"^parallel\.overlap_grad_reduce: has no effect in bf16"):
                check(**overlap)
        else:
            check(**overlap)  # auto is fp32 on a CPU
        check(**overlap, **{"train.precision": "fp32"})
        check(**overlap, **{"parallel.zero_stage": 2, "train.precision": "bf16"})
        with pytest.raises(ConfigError, match=r"^parallel\.grad_bucket_size: has no effect in bf16"):
            check(**{"parallel.grad_bucket_size": 10**6, "train.precision": "bf16"})
        configs = glob.glob(str(REPO / "configs" / "*.yaml"))
        assert len(configs) >= 10
        for config in configs:
            check(config)
