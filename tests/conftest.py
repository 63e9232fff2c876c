"""Shared fixtures: real text from the repository's own sample (data/sample), tokenized once per test session. No
test needs ../shared (SHARED, set by TOKENFORMER_SHARED): what is compared against it there is checked only where it
is present."""
import os
import sys
from pathlib import Path

import pytest
import zstandard

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENFORMER_SHARED", REPO.parent / "shared"))  # the only path to ../shared
SAMPLE = REPO / "data" / "sample"
NEOX = str(REPO / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
sys.path.insert(0, str(REPO))

# The corpus: the first documents of the bundled sample's train split (e-mails, nine speeches, a play), as many tokens
# of its 1k SentencePiece vocabulary as minipile's tiny shard, which the tests used before, had of its own (882,501 in
# 254 documents against 883,309 in 500): the same test times.
CORPUS_DOCS = 254


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """corpus.jsonl.zst (the first CORPUS_DOCS lines of data/sample/train.jsonl.zst, unchanged), a 1k SentencePiece
    tokenizer trained on it, and it as an indexed dataset. Built in about a second."""
    from tokenformer_mp.data.preprocess import preprocess
    from tokenformer_mp.data.reader import iter_lines
    from tokenformer_mp.data.train_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("corpus")
    lines = [line + b"\n" for line, _ in zip(iter_lines(str(SAMPLE / "train.jsonl.zst")), range(CORPUS_DOCS))]
    text = out / "corpus.jsonl.zst"
    text.write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines)))
    model = train_tokenizer([str(text)], str(out / "sp"), 1000)
    preprocess([str(text)], str(out / "corpus"), "SentencePieceTokenizer", model, append_eod=True, workers=1,
               progress=False)
    return {"text": str(text), "prefix": str(out / "corpus_text_document"), "tokenizer": model}


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> dict:
    """The repository's own sample (data/sample/val.jsonl.zst: 44 documents, 0.5M characters, some 150k tokens): a 1k
    SentencePiece tokenizer trained on it, and it as an indexed dataset. Needs nothing outside the repository (the GPU
    check runs on nodes without ../shared); built in seconds."""
    from tokenformer_mp.data.preprocess import preprocess
    from tokenformer_mp.data.train_tokenizer import train_tokenizer

    # TOKENFORMER_SAMPLE_DIR: built once for every pytest process of a GPU check, not once each
    given = os.environ.get("TOKENFORMER_SAMPLE_DIR")
    out = Path(given) if given else tmp_path_factory.mktemp("sample")
    text, data = str(SAMPLE / "val.jsonl.zst"), {"prefix": str(out / "sample_text_document"),
                                                 "tokenizer": str(out / "sp.model")}
    if not (os.path.exists(data["tokenizer"]) and os.path.exists(data["prefix"] + ".idx")):
        train_tokenizer([text], str(out / "sp"), 1000, overwrite=True)
        preprocess([text], str(out / "sample"), "SentencePieceTokenizer", data["tokenizer"], append_eod=True,
                   workers=1, overwrite=True, progress=False)
    return data


def debug_overrides(data: dict, run_dir, **kw) -> dict:
    """The debug config on a fixture's data (corpus, sample), small enough for several ranks on two cores. On the CPU
    even where a GPU is present: layouts are compared in fp32 over gloo (tests/test_gpu.py covers the GPU path)."""
    base = {"train.device": "cpu", "data.prefixes": [data["prefix"]], "data.tokenizer_model": data["tokenizer"],
            "data.tokenizer_type": "SentencePieceTokenizer", "run_dir": str(run_dir),
            "model.seq_length": 64, "train.micro_batch_size": 2, "train.grad_accum_steps": 2,
            "train.eval_interval": 0, "train.warmup_steps": 2, "train.log_interval": 1}
    base.update(kw)
    return base


def assert_close_to_scale(actual, expected, rel: float, msg: str = "") -> None:
    """Every element of `actual` within rel x max|expected| of `expected` (shapes equal).

    Tolerances are stated against a tensor's scale, not an element's own size: fp32 BLAS kernels sum in another order
    on another CPU (AVX2 or AVX-512, Intel or AMD), which moves an element near zero by far more than itself."""
    import torch

    a, e = torch.as_tensor(actual).detach().double().cpu(), torch.as_tensor(expected).detach().double().cpu()
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    scale, err = e.abs().max().item(), (a - e).abs().max().item()
    assert err <= rel * scale, f"{msg}: largest error {err:.3g} > {rel:g} x the reference's scale {scale:.3g}"
