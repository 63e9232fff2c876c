"""Data pipeline tests on real files: the corpus fixture (the first documents of data/sample/train.jsonl.zst) and the
bundled sample's val split, the bundled GPT-NeoX tokenizer, a SentencePiece model trained here."""

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests.conftest import CORPUS_DOCS, NEOX, REPO, SAMPLE, debug_overrides
from tests.runs import FaultyDataset
from tokenformer_mp.bench.synthetic import RandomTokens
from tokenformer_mp.data.batches import POLL_S, Batches, DataError
from tokenformer_mp.data.bench import benchmark_preprocessing
from tokenformer_mp.data.datasets import build_datasets
from tokenformer_mp.data.preprocess import preprocess
from tokenformer_mp.data.reader import BadLine, ReadStats, iter_lines, read_texts
from tokenformer_mp.data.train_tokenizer import train_tokenizer
from tokenformer_mp.tokenizer import build_tokenizer

VAL = str(SAMPLE / "val.jsonl.zst")


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    return [t for (t,) in read_texts([corpus["text"]])]


@pytest.fixture(scope="module")
def neox():
    return build_tokenizer("HFTokenizer", NEOX)


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory) -> str:
    return train_tokenizer([corpus["text"]], str(tmp_path_factory.mktemp("sp") / "sp512"), vocab_size=512,
                           max_sentences=5000)


@pytest.fixture(scope="module")
def neox_prefix(corpus, tmp_path_factory) -> str:
    """The corpus tokenized by two worker processes."""
    prefix = str(tmp_path_factory.mktemp("neox") / "corpus")
    out = preprocess([corpus["text"]], prefix, "HFTokenizer", NEOX, workers=2, progress=False)
    return out["outputs"]["text"]


@pytest.fixture(scope="module")
def val_prefix(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("val") / "val")
    out = preprocess([VAL], prefix, "HFTokenizer", NEOX, progress=False)
    return out["outputs"]["text"]


# --- tokenizers ---

SAMPLES = ["Hello  world\n\n\tindented", "naïve café, 漢字 and 🙂", " leading space", "x = [1, 22, 333]\n", ""]


def test_neox_tokenizer(neox, texts):
    assert (neox.vocab_size, neox.eod, neox.pad) == (50277, 0, 1)
    assert neox.encode("<|endoftext|>") == [0]
    for text in SAMPLES + texts[:50]:
        assert neox.decode(neox.encode(text)) == text
    assert neox.encode_batch(texts[:50]) == [neox.encode(t) for t in texts[:50]]


def test_sentencepiece_tokenizer(sp_model, texts):
    sp = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert (sp.vocab_size, sp.eod, sp.pad) == (512, 2, 3)
    for text in SAMPLES + texts[:50]:  # byte fallback: lossless, newlines and emoji included
        assert sp.decode(sp.encode(text)) == text
    ids = sp.encode(texts[0])
    assert len(ids) > 0 and max(ids) < 512 and sp.eod not in ids
    assert sp.encode_batch(texts[:50]) == [sp.encode(t) for t in texts[:50]]


def test_build_tokenizer_errors(tmp_path, sp_model, corpus):
    with pytest.raises(ValueError, match="GPT2BPETokenizer"):
        build_tokenizer("GPT2BPETokenizer", NEOX)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_tokenizer("HFTokenizer", str(tmp_path / "nope.json"))
    with pytest.raises(FileExistsError, match=r"sp512\.model"):  # train_tokenizer refuses to overwrite
        train_tokenizer([corpus["text"]], sp_model[: -len(".model")], vocab_size=512)


# --- preprocessing ---


def assert_round_trip(prefix: str, tok, texts: list[str]) -> None:
    ds = IndexedDataset(prefix)
    assert len(ds) == len(texts)
    assert ds.index.dtype == np.uint16  # both vocabularies are below 65500 ids
    assert ds.document_indices.tolist() == list(range(len(texts) + 1))  # one document per sequence
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + [tok.eod], f"document {i}"


def test_preprocess_neox_round_trip(neox_prefix, neox, texts):
    assert len(texts) == CORPUS_DOCS
    assert_round_trip(neox_prefix, neox, texts)


def test_preprocess_sentencepiece_round_trip(tmp_path, sp_model, corpus, texts):
    sp = build_tokenizer("SentencePieceTokenizer", sp_model)
    stats = preprocess([corpus["text"]], str(tmp_path / "sp"), "SentencePieceTokenizer", sp_model, batch_size=64,
                       progress=False)
    assert (stats["docs"], stats["bad_lines"]) == (CORPUS_DOCS, 0)
    assert stats["tokens"] == sum(len(ids) + 1 for ids in sp.encode_batch(texts))
    assert stats["bytes"] == sum(len(t.encode()) for t in texts)
    assert_round_trip(stats["outputs"]["text"], sp, texts)


def test_preprocess_several_keys_without_eod(tmp_path, neox):
    rows = [{"text": f"document {i}", "title": f"title {i}"} for i in range(7)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = preprocess([str(src)], str(tmp_path / "out"), "HFTokenizer", NEOX, json_keys=["text", "title"],
                       append_eod=False, progress=False)  # fmt: skip
    for key in ("text", "title"):
        ds = IndexedDataset(stats["outputs"][key])
        assert [ds[i].tolist() for i in range(len(ds))] == [neox.encode(r[key]) for r in rows]


@pytest.mark.parametrize("eod", [True, False])
def test_preprocess_sentencepiece_native_arrays_with_and_without_eod(tmp_path, sp_model, eod):
    """SentencePiece hands back numpy arrays (no Python int per token); empty documents included."""
    sp = build_tokenizer("SentencePieceTokenizer", sp_model)
    rows = [{"text": t} for t in ("first document", "", "a third, longer document with more words in it", "")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = preprocess([str(src)], str(tmp_path / "out"), "SentencePieceTokenizer", sp_model, append_eod=eod,
                       batch_size=3, progress=False)  # fmt: skip
    ds = IndexedDataset(stats["outputs"]["text"])
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(r["text"]) + [sp.eod] * eod for r in rows]


@pytest.fixture
def bad_inputs(tmp_path) -> tuple[Path, Path, list[str]]:
    """A .jsonl with 4 bad lines among 6 good ones, and a .jsonl.zst cut in half."""
    lines = [
        b'{"text": "good 1"}',
        b'{"text": "bad json',  # line 2
        b'{"txt": "missing key"}',  # line 3
        b'{"text": 42}',  # line 4
        b'{"text": "good 2"}',
        b"",  # blank: neither a document nor a bad line
        b'{"text": "bad \xff\xfe utf-8"}',  # line 7
        b'{"text": "good 3", "meta": {"pile_set_name": "x"}}',
        b'{"text": "good 4"}',
        b'{"text": "good 5"}',
        b'{"text": "good 6"}',
    ]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    many = [json.dumps({"text": f"zst document {i} " + "x" * (i % 97)}) for i in range(5000)]
    blob = zstandard.ZstdCompressor().compress("\n".join(many).encode() + b"\n")
    cut = tmp_path / "b.jsonl.zst"
    cut.write_bytes(blob[: len(blob) // 2])
    return plain, cut, [json.loads(m)["text"] for m in many]


def test_bad_lines_counted_and_reported(bad_inputs, caplog):
    plain, cut, zst_texts = bad_inputs
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="tokenformer_mp.data.reader"):
        texts = [t for (t,) in read_texts([str(plain), str(cut)], stats=stats)]
    assert texts[:6] == [f"good {i}" for i in range(1, 7)]
    read_from_cut = texts[6:]
    assert 0 < len(read_from_cut) < len(zst_texts)
    assert read_from_cut == zst_texts[: len(read_from_cut)]  # a clean prefix, then the damage is one bad line
    assert (stats.docs, stats.bad_lines) == (len(texts), 5)
    report = caplog.text
    for where in (f"{plain}:2: invalid JSON", f"{plain}:3: missing key 'text'", f"{plain}:4: key 'text' holds a int",
                  f"{plain}:7: invalid UTF-8", f"{cut}:{len(read_from_cut) + 1}: corrupt zstd stream"):  # fmt: skip
        assert where in report


def test_concatenated_zst_frames(tmp_path):
    path = tmp_path / "two.jsonl.zst"
    frames = [zstandard.ZstdCompressor().compress(f'{{"text": "frame {i}"}}\n'.encode()) for i in range(2)]
    path.write_bytes(b"".join(frames))  # as `cat a.zst b.zst` makes: a valid zstd file
    assert list(read_texts([str(path)], strict=True)) == [("frame 0",), ("frame 1",)]


def test_bad_line_report_is_capped(bad_inputs, caplog):
    plain, _, _ = bad_inputs
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="tokenformer_mp.data.reader"):
        assert len(list(read_texts([str(plain)] * 3, stats=stats, max_reported=5))) == 18
    assert stats.bad_lines == 12
    assert len(caplog.records) == 6  # 5 lines reported, then one notice that more were counted


def test_strict_raises_with_file_and_line(bad_inputs, tmp_path):
    plain, cut, _ = bad_inputs
    with pytest.raises(BadLine, match=f"{plain}:2: invalid JSON"):
        list(read_texts([str(plain)], strict=True))
    with pytest.raises(BadLine, match=f"{cut}:[0-9]+: corrupt zstd stream"):
        list(read_texts([str(cut)], strict=True))
    stats = preprocess([str(plain)], str(tmp_path / "lenient"), "HFTokenizer", NEOX, progress=False)
    assert (stats["docs"], stats["bad_lines"]) == (6, 4)


def test_inputs_must_exist(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="no input file matches .*nothing-\\*.jsonl"):
        list(read_texts([str(tmp_path / "nothing-*.jsonl")]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), "HFTokenizer", NEOX, progress=False)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        preprocess([corpus["text"]], str(tmp_path / "o"), "HFTokenizer", NEOX, workers=0, progress=False)


def test_existing_output_refused(tmp_path, corpus):
    prefix, text = str(tmp_path / "out"), corpus["text"]
    first = preprocess([text], prefix, "HFTokenizer", NEOX, max_docs=20, progress=False)
    assert first["docs"] == 20
    with pytest.raises(FileExistsError, match=r"out_text_document\.bin"):
        preprocess([text], prefix, "HFTokenizer", NEOX, max_docs=10, progress=False)
    assert len(IndexedDataset(first["outputs"]["text"])) == 20  # untouched
    preprocess([text], prefix, "HFTokenizer", NEOX, max_docs=10, overwrite=True, progress=False)
    assert len(IndexedDataset(first["outputs"]["text"])) == 10


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_leaves_no_output(tmp_path, corpus, workers):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)) + "not json\n")
    out = tmp_path / "out"
    out.mkdir()

    def fail(**kw):
        with pytest.raises(BadLine, match=r"in\.jsonl:51"):
            preprocess([str(src)], str(out / "x"), "HFTokenizer", NEOX, workers=workers, strict=True, batch_size=8,
                       progress=False, **kw)  # fmt: skip

    fail()
    assert list(out.iterdir()) == []  # neither final nor temporary files
    old = preprocess([corpus["text"]], str(out / "x"), "HFTokenizer", NEOX, max_docs=20,
                     progress=False)["outputs"]["text"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail(overwrite=True)  # a failed overwrite keeps the previous output whole
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(before) == ["x_text_document.bin", "x_text_document.idx"] and len(IndexedDataset(old)) == 20


def test_preprocess_cli(tmp_path, corpus):
    pattern = str(Path(corpus["text"]).with_name("c*s.jsonl.zst"))  # matches corpus.jsonl.zst alone
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", pattern,
           "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type", "HFTokenizer", "--tokenizer-model", NEOX,
           "--max-docs", "30"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("30 docs, ") and " 0 bad lines, " in run.stdout
    assert len(IndexedDataset(str(tmp_path / "cli_text_document"))) == 30


def test_preprocess_cli_bad_input_is_one_line_and_writes_nothing(bad_inputs, tmp_path):
    plain, _, _ = bad_inputs
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(plain), "--output-prefix", str(tmp_path / "out"),
           "--tokenizer-type", "HFTokenizer", "--tokenizer-model", NEOX, "--strict"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"error: {plain}:2: invalid JSON" in run.stderr
    assert not list(tmp_path.glob("out*"))


def test_train_tokenizer_cli(tmp_path, corpus):
    cmd = [sys.executable, "tools/train_tokenizer.py", "--input", corpus["text"], "--model-prefix",
           str(tmp_path / "cli"), "--vocab-size", "400", "--max-sentences", "2000"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.model", "cli.vocab"]  # no temporary files left
    assert build_tokenizer("SentencePieceTokenizer", str(tmp_path / "cli.model")).vocab_size == 400


def test_benchmark_counts_agree(neox, corpus, texts):
    result = benchmark_preprocessing([corpus["text"]], "HFTokenizer", NEOX, workers=1, max_docs=100, repeats=1)
    assert result["docs"] == 100
    assert result["tokens"] == sum(len(neox.encode(t)) for t in texts[:100])
    assert result["ratio"] == pytest.approx(result["pipeline_tokens_per_s"] / result["bare_tokens_per_s"])
    assert 0 < result["ratio"] < 10


def test_bundled_sample():
    domains = {"Speeches", "Books (Gutenberg)", "Emails"}
    sizes = {split: os.path.getsize(REPO / f"data/sample/{split}.jsonl.zst") for split in ("train", "val")}
    assert 2e6 <= sum(sizes.values()) <= 4e6
    for split in sizes:
        docs = [json.loads(line) for line in iter_lines(str(REPO / f"data/sample/{split}.jsonl.zst"))]
        assert {d["meta"]["pile_set_name"] for d in docs} == domains
        assert all(isinstance(d["text"], str) and d["text"] for d in docs)


# --- datasets ---

SEQ = 64
SIZES = (1000, 40, 40)


def blend(prefixes, seed, cache_dir, tok):
    return build_datasets(prefixes, [0.5, 0.5], "90,5,5", SEQ, seed, SIZES, tok, cache_dir)


def tokens_of(dataset, n: int) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in range(n)]


def test_datasets_deterministic_and_shifted(neox_prefix, val_prefix, neox, tmp_path):
    train, valid, test = blend([neox_prefix, val_prefix], 1234, str(tmp_path / "c1"), neox)
    assert not dist.is_initialized()  # the temporary process group is gone
    assert (len(train), len(valid), len(test)) == SIZES
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].dtype == torch.int64 and sample["tokens"].shape == (SEQ,)
    for ds in (train, valid, test):
        for i in range(0, len(ds), 7):
            s = ds[i]
            assert torch.equal(s["labels"][:-1], s["tokens"][1:])
            assert torch.equal(s["loss_mask"], torch.ones(SEQ))
    again, *_ = blend([neox_prefix, val_prefix], 1234, str(tmp_path / "c2"), neox)
    other, *_ = blend([neox_prefix, val_prefix], 99, str(tmp_path / "c1"), neox)
    assert tokens_of(train, 50) == tokens_of(again, 50)
    assert sum(a != b for a, b in zip(tokens_of(train, 50), tokens_of(other, 50))) > 40
    # Weights 0.5/0.5: each prefix gives half the samples.
    assert np.bincount(train.dataset.dataset_index[: len(train)]).tolist() == [500, 500]


def test_no_sample_repeated_within_an_epoch(neox_prefix, val_prefix, neox, tmp_path):
    train, *_ = blend([neox_prefix, val_prefix], 7, str(tmp_path), neox)
    blended = train.dataset
    docs = [IndexedDataset(p) for p in (neox_prefix, val_prefix)]
    starts = set()
    for i in range(len(train)):
        which, j = int(blended.dataset_index[i]), int(blended.dataset_sample_index[i])
        gpt = blended.datasets[which]
        assert len(gpt.document_index) == len(gpt.indices)  # the index spans one epoch: each document once
        begin_doc, offset = gpt.sample_index[gpt.shuffle_index[j]]
        doc = int(gpt.document_index[begin_doc])
        starts.add((which, doc, int(offset)))
        assert train[i]["tokens"][0] == int(docs[which][doc][offset])  # the sample starts where the index says
    assert len(starts) == len(train)


def test_single_prefix(neox_prefix, neox, tmp_path):
    train, valid, test = build_datasets([neox_prefix], None, "100,0,0", SEQ, 3, (200, 0, 0), neox, str(tmp_path))
    assert (len(train), valid, test) == (200, None, None)
    assert set(train[199]) == {"tokens", "labels", "loss_mask", "position_ids"}
    with pytest.raises(IndexError):
        train[200]


def test_missing_prefix(neox_prefix, neox, tmp_path):
    missing = str(tmp_path / "nothing_text_document")
    with pytest.raises(FileNotFoundError, match="nothing_text_document"):
        build_datasets([neox_prefix, missing], [1, 1], "90,5,5", SEQ, 1, SIZES, neox, None)


def _rank_main(rank, store_path, prefixes, cache_dir, queue):
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    train, *_ = blend(prefixes, 1234, cache_dir, build_tokenizer("HFTokenizer", NEOX))
    queue.put((rank, tokens_of(train, 20)))
    dist.destroy_process_group()


def test_two_ranks_build_the_same_samples(neox_prefix, val_prefix, neox, tmp_path):
    expected = tokens_of(blend([neox_prefix, val_prefix], 1234, str(tmp_path / "single"), neox)[0], 20)
    ctx = mp.get_context("fork")  # the children inherit the imported modules: no 5 s megatron import each
    queue = ctx.Queue()
    args = (str(tmp_path / "store"), [neox_prefix, val_prefix], str(tmp_path / "shared"), queue)
    procs = [ctx.Process(target=_rank_main, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == {0: expected, 1: expected}


def test_truncated_zst_is_an_error_unless_allowed(bad_inputs, tmp_path, capsys):
    """A .zst cut mid-stream: an error naming the file (nothing written); with --allow-truncated the documents
    before the cut are kept and the summary says what was lost."""
    import importlib.util
    _, cut, zst_texts = bad_inputs
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    with pytest.raises(ValueError, match=f"{cut}: corrupt or truncated zstd stream after line [0-9]+ "
                                         r"\(([0-9]+) documents read from it\).*bytes lost; pass --allow-truncated"):
        preprocess([str(cut)], str(tmp_path / "strict"), "HFTokenizer", NEOX, progress=False)
    assert list(tmp_path.iterdir()) == []
    spec = importlib.util.spec_from_file_location("preprocess_tool", REPO / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--input", str(cut), "--output-prefix", str(tmp_path / "kept"), "--tokenizer-type",
                      "HFTokenizer", "--tokenizer-model", NEOX, "--workers", "1", "--allow-truncated"]) == 0
    kept = len(IndexedDataset(str(tmp_path / "kept_text_document")))
    assert 0 < kept < len(zst_texts)
    out = capsys.readouterr().out
    assert f"truncated input (--allow-truncated): {cut}: corrupt or truncated zstd stream" in out
    assert f"({kept} documents read from it)" in out and "bytes lost" in out, out


def test_rerun_removes_what_a_killed_run_left(tmp_path, corpus):
    """kill -9 while preprocessing (an --overwrite of an earlier output) leaves {prefix}.tmpPID.bin and a scratch
    directory named after the output; the next run of the same output removes both, though the killed process is
    still a zombie (its parent has not waited) and though that run is then refused (the output exists), and a run
    with --overwrite writes a whole dataset."""
    import glob
    import tempfile
    import time

    from tokenformer_mp.data.preprocess import scratch_prefix
    out = str(tmp_path / "out")
    preprocess([corpus["text"]], out, "HFTokenizer", NEOX, max_docs=5, progress=False)
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", *[corpus["text"]] * 4, "--output-prefix", out,
           "--tokenizer-type", "HFTokenizer", "--tokenizer-model", NEOX, "--workers", "1", "--batch-size", "2",
           "--overwrite"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def leftovers():
        return (glob.glob(f"{out}_text_document.tmp*") +
                glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(scratch_prefix(out)) + "*")))
    deadline = time.time() + 120
    while time.time() < deadline and len(leftovers()) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, and left a zombie: not reaped
    left = leftovers()
    assert any(p.endswith(".bin") for p in left) and any(os.path.isdir(p) for p in left), left
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        preprocess([corpus["text"]], out, "HFTokenizer", NEOX, max_docs=10, progress=False)
    assert not any(os.path.exists(p) for p in left) and not leftovers()
    proc.wait()
    stats = preprocess([corpus["text"]], out, "HFTokenizer", NEOX, max_docs=10, progress=False, overwrite=True)
    assert len(IndexedDataset(stats["outputs"]["text"])) == 10 and not leftovers()


def test_torn_dataset_cache_is_rebuilt(neox_prefix, val_prefix, neox, tmp_path, caplog):
    """A cache a killed build left torn (an index array cut short, a set missing its description) and a staging
    directory of a dead build: detected, named, removed, rebuilt; the samples are the same."""
    import socket

    from tokenformer_mp.data.datasets import CACHE_NAME, npy_problem
    cache = tmp_path / "cache"
    first = tokens_of(blend([neox_prefix, val_prefix], 1234, str(cache), neox)[0], 20)
    names = sorted(p.name for p in cache.iterdir())
    assert names and all(CACHE_NAME.match(n) for n in names)  # no staging left behind
    shuffle = next(cache.glob("*-GPTDataset-train-shuffle_index.npy"))
    shuffle.write_bytes(shuffle.read_bytes()[: shuffle.stat().st_size // 2])
    next(cache.glob("*-BlendedDataset-valid-description.txt")).unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cache / f".build.{socket.gethostname()}.{int(dead.stdout)}").mkdir()
    with caplog.at_level(logging.WARNING, logger="tokenformer_mp.data.datasets"):
        again = tokens_of(blend([neox_prefix, val_prefix], 1234, str(cache), neox)[0], 20)
    assert again == first
    assert f"{shuffle.name[: -len('-shuffle_index.npy')]}-*: shuffle_index.npy: " in caplog.text
    assert "(a torn write); removed, it is rebuilt" in caplog.text and "description.txt missing" in caplog.text
    assert sorted(p.name for p in cache.iterdir()) == names
    assert all(npy_problem(str(p)) is None for p in cache.glob("*.npy"))


def test_prefetched_batches_are_the_same_in_the_same_order():
    """data.prefetch_steps: the batches a background thread assembles ahead equal those assembled when needed, step
    by step and across a jump (a resume at step 7); and a step reads the same samples at DP=1 and DP=2."""
    ds = RandomTokens(500, 16, 1000)
    cpu = torch.device("cpu")

    def steps(batches, order):
        return [[torch.cat([t.reshape(-1) for t in (tok, lab, m)]) for tok, (lab, m) in batches.micro_batches(s)]
                for s in order]

    order = [0, 1, 2, 7, 8, 3]
    for dp, rank in ((1, 0), (2, 0), (2, 1)):
        plain = steps(Batches(ds, dp, rank, 2, 3, cpu), order)
        ahead = Batches(ds, dp, rank, 2, 3, cpu, prefetch=2)
        got = steps(ahead, order)
        ahead.close()
        assert all(torch.equal(a, b) for x, y in zip(plain, got) for a, b in zip(x, y)), (dp, rank)
        assert ahead.wait_s > 0
    one = Batches(ds, 1, 0, 2, 4, cpu)  # DP=1: 4 micro-batches of 2; DP=2: 2 each, the same 8 samples in order
    two = [Batches(ds, 2, r, 2, 2, cpu) for r in (0, 1)]
    for s in (0, 5):
        whole = [tok for tok, _ in one.micro_batches(s)]
        split = [tok for b in two for tok, _ in b.micro_batches(s)]
        assert torch.equal(torch.cat(whole), torch.cat(split))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_input_error_comes_at_its_step_as_a_data_error(prefetch, tmp_path):
    """Sample 19 raises (step 3, of 6 samples a step): steps 0-2 come whole, then step 3 raises a DataError naming it
    and the cause, with or without the prefetch thread (where it once ended the thread and left the loop waiting)."""
    ds = FaultyDataset(RandomTokens(500, 16, 1000), 19, "raise", str(tmp_path / "flag"))
    batches = Batches(ds, 1, 0, 2, 3, torch.device("cpu"), prefetch=prefetch, source="the test's data")
    for step in range(3):
        assert batches.wait(step) and len(list(batches.micro_batches(step))) == 3
    with pytest.raises(DataError, match=r"^the input of step 4 could not be read from the test's data: IndexError: "
                                        r"index 19 is out of bounds \(injected\) \(at .*/tests/runs.py:\d+\)$"):
        batches.wait(3) and list(batches.micro_batches(3))
    batches.close()


def test_a_wait_for_input_that_does_not_come_can_be_interrupted(tmp_path):
    """A read that does not return (sample 6: step 1): wait() gives up once interrupted() is true, within its poll
    interval, and takes the batch once it comes; close() does not wait for a thread stuck in a read."""
    ds = FaultyDataset(RandomTokens(500, 16, 1000), 6, "block", str(tmp_path / "flag"))
    batches = Batches(ds, 1, 0, 2, 3, torch.device("cpu"), prefetch=2)
    assert batches.wait(0) and len(list(batches.micro_batches(0))) == 3
    calls, start = [], time.perf_counter()
    assert not batches.wait(1, lambda: calls.append(1) or len(calls) >= 3)
    assert len(calls) == 3 and 2 * POLL_S <= time.perf_counter() - start < 3 * POLL_S + 0.5
    ds.release.set()
    assert batches.wait(1, lambda: False) and len(list(batches.micro_batches(1))) == 3
    ds.release.clear()
    batches.close()
    stuck = Batches(ds, 1, 0, 2, 3, torch.device("cpu"), prefetch=2)
    assert not stuck.wait(1, lambda: True)
    start = time.perf_counter()
    stuck.close()
    assert time.perf_counter() - start < 2.0
    ds.release.set()


def test_index_cache_is_built_before_any_collective_and_found_when_prebuilt(corpus, tmp_path):
    """Rank 1 started alone waits for rank 0's index cache longer than parallel.timeout_s (6 s against 2): the
    build happens before any process group, so no collective times out; and a cache built beforehand by
    tools/build_data_cache.py is what the trainer loads (its files untouched)."""
    from tests.test_training import _args
    from tokenformer_mp.parallel.local import _free_port

    def start(rank: int, run, **kw) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = _args(debug_overrides(corpus, run, **{"train.steps": 1, "parallel.timeout_s": 2, **kw}))
        return subprocess.Popen([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    port = _free_port()
    late = start(1, tmp_path / "a")
    time.sleep(6)
    assert late.poll() is None, late.communicate()[0][-3000:]  # still waiting, no process group to time out
    first = start(0, tmp_path / "a")
    outs = [p.communicate(timeout=300)[0] for p in (late, first)]
    assert [late.returncode, first.returncode] == [0, 0], "\n".join(o[-2000:] for o in outs)

    run = tmp_path / "b"
    res = subprocess.run([sys.executable, "tools/build_data_cache.py", "--config", "configs/debug.yaml",
                          *_args(debug_overrides(corpus, run, **{"train.steps": 1}))], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    cache = run / "data_cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix == ".npy"}
    assert len(before) >= 6
    subprocess.run([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml",
                    *_args(debug_overrides(corpus, run, **{"train.steps": 1}))], cwd=REPO, check=True,
                   capture_output=True)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix == ".npy"} == before
