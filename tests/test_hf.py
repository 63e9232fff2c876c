"""Hugging Face export: transformers' own loaders give the project's logits, greedy tokens and token ids."""
import itertools
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the hub (the export is a local directory)

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import NEOX, SAMPLE, assert_close_to_scale
from tokenformer_mp.checkpoint import load_weights, write_layout_free
from tokenformer_mp.config import NORMS, Config, GrowthRecipe, ModelConfig, load_config
from tokenformer_mp.convert import export_neox, import_neox, model_config_from_neox, tokenizer_from_neox
from tokenformer_mp.data.reader import read_texts
from tokenformer_mp.hf.export import export_hf, hf_model, sentencepiece_to_tokenizers
from tokenformer_mp.inference import generate, load_model
from tokenformer_mp.model import TokenFormer
from tokenformer_mp.reshard import ExpandPlan, reshard
from tokenformer_mp.tokenizer import build_tokenizer
from tools.convert_checkpoint import main

DEBUG = load_config("configs/debug.yaml").model  # the debug model's shape, at a 1,024-id vocabulary


def _random_model(cfg: ModelConfig, seed: int = 0) -> TokenFormer:
    """Weights far from init (std 0.1 everywhere, final norm included): sharper scores, far-from-uniform logits. (At
    std 0.3 the softmax norm's fp32 forward is itself 2e-4 off float64: too ill-conditioned to compare at 1e-5.)"""
    torch.manual_seed(seed)
    model = TokenFormer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _checkpoint(path, cfg: ModelConfig, tokenizer_model: str, seed: int = 0) -> TokenFormer:
    model = _random_model(cfg, seed)
    config = Config(model=cfg)
    config.data.tokenizer_model = tokenizer_model
    config.data.tokenizer_type = "HFTokenizer" if tokenizer_model.endswith(".json") else "SentencePieceTokenizer"
    write_layout_free(dict(model.named_parameters()), config, str(path))
    return model


def _real_texts(n: int) -> list[str]:
    """The bundled sample's first n documents, its val split first: e-mails (headers included), speeches, plays."""
    texts = read_texts([str(SAMPLE / "val.jsonl.zst"), str(SAMPLE / "train.jsonl.zst")], ("text",))
    return [text for (text,) in itertools.islice(texts, n)]


@pytest.fixture(scope="module")
def debug_export(corpus, tmp_path_factory):
    """The debug model (random weights, the corpus's SentencePiece tokenizer) and its fp32 Hugging Face export."""
    tmp = tmp_path_factory.mktemp("hf")
    cfg = ModelConfig(**{**DEBUG.__dict__, "vocab_size": 1024})
    model = _checkpoint(tmp / "ckpt", cfg, corpus["tokenizer"])
    export_hf(str(tmp / "ckpt"), str(tmp / "hf"))
    return model, str(tmp / "hf")


TOKENS = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(1))


def test_export_loads_with_auto_classes_and_gives_the_same_logits(debug_export):
    model, out = debug_export
    assert sorted(os.listdir(out)) == ["config.json", "configuration_tokenformer.py", "generation_config.json",
                                       "model.safetensors", "modeling_tokenformer.py", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert json.load(open(os.path.join(out, "config.json")))["auto_map"] == {
        "AutoConfig": "configuration_tokenformer.TokenFormerConfig",
        "AutoModelForCausalLM": "modeling_tokenformer.TokenFormerForCausalLM"}
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        expected = model(TOKENS)
        assert_close_to_scale(hf(TOKENS).logits, expected, 1e-5, "HF vs project logits")
        # the KV cache: a prompt, then one token at a time, gives the same last-position logits
        out1 = hf(TOKENS[:, :100], use_cache=True)
        cache = out1.past_key_values
        for t in range(100, 128):
            step = hf(TOKENS[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
        assert_close_to_scale(step.logits[:, -1], expected[:, -1], 1e-5, "HF with its KV cache")
        loss = hf(TOKENS, labels=TOKENS).loss
        ref = torch.nn.functional.cross_entropy(expected[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())
        assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


@pytest.mark.parametrize("norm", NORMS + ("transformer",))
def test_modeling_file_equals_the_project_model_for_every_norm(norm):
    """The package's own modeling module (the file every export carries), at each Pattention normalisation, and
    as the Transformer baseline (an MLP width of its own)."""
    arch = {"arch": "transformer", "ffn_hidden_size": 90} if norm == "transformer" else {"norm": norm}
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=30, proj_tokens=18, ffn_tokens=70,
                      seq_length=32, vocab_size=256, rotary_pct=0.5, rotary_base=500.0, layernorm_eps=1e-3, **arch)
    model = _random_model(cfg)
    x = TOKENS[:, :32] % 256
    with torch.no_grad():
        assert_close_to_scale(hf_model(model)(x).logits, model(x), 1e-5, norm)


def test_transformer_export_gives_the_native_logits_and_tokens(corpus, tmp_path):
    """configs/transformer-debug.yaml's model exported: the shipped modeling file builds the Transformer from
    config.json (arch, ffn_hidden_size) and gives the project's logits, with and without its KV cache, and greedy
    tokens; the export loads back into the project (generate, evaluate, lm-eval read it so) as the same model."""
    cfg = load_config("configs/transformer-debug.yaml").model
    cfg.vocab_size = 1024
    model = _checkpoint(tmp_path / "ckpt", cfg, corpus["tokenizer"])
    assert main(["export-hf", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")]) == 0
    written = json.load(open(tmp_path / "hf" / "config.json"))
    assert (written["arch"], written["ffn_hidden_size"]) == ("transformer", 768)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32)
    assert hf.model.layers[0].ffn.up.weight.shape == (768, 128)
    back, _ = load_model(str(tmp_path / "hf"))
    assert (back.cfg.arch, back.cfg.ffn_width) == ("transformer", 768)
    with torch.no_grad():
        expected = model(TOKENS)
        assert_close_to_scale(hf(TOKENS).logits, expected, 1e-5, "HF vs project logits")
        assert torch.equal(back(TOKENS), expected)
        cache = hf(TOKENS[:, :100], use_cache=True).past_key_values
        for t in range(100, 128):
            step = hf(TOKENS[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
        assert_close_to_scale(step.logits[:, -1], expected[:, -1], 1e-5, "HF with its KV cache")
        prompt = TOKENS[:1, :20]
        got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                          eos_token_id=None)[0, 20:].tolist()
    assert got == list(generate(model, prompt[0].tolist(), 20, temperature=0))


def test_grown_checkpoint_keeps_its_pinned_tau(corpus, tmp_path):
    """Grown with random keys (the function changes, so a tau taken from the new token counts would show)."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=30, proj_tokens=18, ffn_tokens=70,
                      seq_length=64, vocab_size=1024)
    _checkpoint(tmp_path / "ckpt", cfg, corpus["tokenizer"])
    reshard(str(tmp_path / "ckpt"), str(tmp_path / "grown"), progress=False,
            expand=ExpandPlan({"qkv": 45, "proj": 40, "ffn": 100}, GrowthRecipe(key_init="normal")))
    grown, _ = load_model(str(tmp_path / "grown"))
    assert (grown.cfg.qkv_tokens, grown.cfg.qkv_scale_tokens) == (45, 30)
    assert main(["export-hf", "--load", str(tmp_path / "grown"), "--save", str(tmp_path / "bad"), "--tokenizer-type",
                 "HFTokenizer", "--tokenizer-model", str(tmp_path / "none.json")]) == 2  # named, nothing written
    assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "bad.partial")
    assert main(["export-hf", "--load", str(tmp_path / "grown"), "--save", str(tmp_path / "hf")]) == 0  # the tool
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32)
    x = TOKENS[:, :64]
    with torch.no_grad():
        assert_close_to_scale(hf(x).logits, grown(x), 1e-5, "grown")
    assert hf.model.layers[0].ffn.tau == 70**0.5


def test_greedy_generate_gives_the_project_tokens(debug_export):
    model, out = debug_export
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    prompts = ["The history of the", "In 1998, researchers found"]
    expected = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        got = hf.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
        ours = list(generate(model, ids["input_ids"][0].tolist(), 40, temperature=0))
        if tok.eos_token_id in ours:  # transformers stops at the end-of-document id
            ours = ours[:ours.index(tok.eos_token_id) + 1]
        assert got == ours, p
        expected.append(got)
    # a left-padded batch (how lm-eval's generate_until calls it): each row as it was alone
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].all())
    rows = hf.generate(**batch, max_new_tokens=40, do_sample=False)[:, batch["input_ids"].shape[1]:].tolist()
    for row, want in zip(rows, expected):
        assert row[:len(want)] == want


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HFTokenizer"])
def test_tokenizer_gives_the_project_ids(kind, corpus, tmp_path):
    path = corpus["tokenizer"] if kind == "SentencePieceTokenizer" else NEOX
    ours = build_tokenizer(kind, path)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_heads=2, qkv_tokens=8, proj_tokens=8, ffn_tokens=8,
                      seq_length=16, vocab_size=-(-ours.vocab_size // 128) * 128)
    _checkpoint(tmp_path / "ckpt", cfg, path)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    texts = _real_texts(200) + ["", " ", "  two leading spaces", "tabs\tand\n\nnewlines \n", "digits 12345",
                                "</s> <s> <unk> <|endoftext|> as text", "émoji 😀 中文 ▁"]
    assert sum(map(len, texts)) > 1_000_000  # real text, a megabyte of it
    for tok in (AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True),
                AutoTokenizer.from_pretrained(str(tmp_path / "hf"))):
        assert (tok.eos_token_id, tok.pad_token_id) == (ours.eod, ours.pad)
        for text in texts:
            ids = ours.encode(text)
            assert tok(text)["input_ids"] == ids, text[:80]
            assert tok.decode(ids) == ours.decode(ids), text[:80]
    if kind == "HFTokenizer":  # the file itself travels
        with open(path, "rb") as a, open(tmp_path / "hf" / "tokenizer.json", "rb") as b:
            assert a.read() == b.read()


def test_unconvertible_sentencepiece_is_refused_by_name(tmp_path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50 + ["a b c d e f g"] * 50),
                                   model_prefix=str(tmp_path / "uni"), model_type="unigram", vocab_size=17,
                                   minloglevel=2)
    with pytest.raises(ValueError, match=r"trainer_spec.model_type = UNIGRAM \(converted: BPE\).*normalizer_spec.name"):
        sentencepiece_to_tokenizers(str(tmp_path / "uni.model"))


def test_bf16_export_loads_without_the_project(debug_export, tmp_path):
    """In a fresh interpreter that cannot import tokenformer_mp: the export is self-contained."""
    model, out = debug_export
    src = os.path.dirname(out)
    export_hf(os.path.join(src, "ckpt"), str(tmp_path / "bf16"), dtype="bf16")
    code = ("import sys; sys.modules['tokenformer_mp'] = None  # any import of the project fails\n"
            "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'bf16')!r}, trust_remote_code=True)\n"
            f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'bf16')!r}, trust_remote_code=True)\n"
            "assert m.dtype == torch.bfloat16\n"
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).logits.float(), {str(tmp_path / 'y.pt')!r})\n")
    torch.save(TOKENS, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=300)
    with torch.no_grad():
        assert_close_to_scale(torch.load(tmp_path / "y.pt"), model(TOKENS), 2e-2, "bf16 export vs fp32 project")  # 9e-3


def test_official_weights_after_import_neox_export_to_hf(tmp_path):
    """The paper's released layout (sequential.N.*, its YAML fields) -> import-neox -> export-hf: the same function."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=30, proj_tokens=18, ffn_tokens=70,
                      seq_length=32, vocab_size=50304)
    _checkpoint(tmp_path / "ours", cfg, NEOX)
    export_neox(str(tmp_path / "ours"), str(tmp_path / "neox"))
    import yaml
    neox_cfg = yaml.safe_load(open(tmp_path / "neox" / "config.yml"))
    sd = torch.load(tmp_path / "neox" / "pytorch_model.bin", weights_only=True)
    assert tokenizer_from_neox(neox_cfg) == {"tokenizer_type": "HFTokenizer", "tokenizer_model": NEOX}
    import_neox(sd, model_config_from_neox(neox_cfg, sd), str(tmp_path / "imported"), tokenizer_from_neox(neox_cfg))
    export_hf(str(tmp_path / "imported"), str(tmp_path / "hf"))  # the tokenizer named in the YAML came along
    model = TokenFormer(cfg)
    load_weights(model, str(tmp_path / "ours"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32)
    x = torch.randint(0, 50277, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_to_scale(hf(x).logits, model.eval()(x), 1e-5, "imported official layout")
