"""How close does preprocess() come to the tokenizer's own speed?

(a) bare: the texts already in every worker's memory, encoded with Tokenizer.encode_batch_native (the library's
    fastest output: lists, or numpy arrays for SentencePiece) in the same batches by the same number of
    single-threaded processes, nothing else (no reading, no transfer of texts or tokens, no writing);
(b) pipeline: preprocess() on the same documents, from reading the files to renaming the outputs into place.
Both rates count text tokens only (EOD excluded); ratio = pipeline / bare. The two runs alternate `repeats` times and
the best time of each counts, so that other load on a shared machine disturbs the ratio less.
"""

import itertools
import multiprocessing as mp
import os
import tempfile
import time

from tokenformer_mp.data.preprocess import preprocess
from tokenformer_mp.data.reader import read_texts
from tokenformer_mp.tokenizer import build_tokenizer

# Bare-run worker state, inherited through fork so that the texts are in each worker's memory before the clock starts.
_bare: dict = {}


def _bare_init(barrier) -> None:
    _bare["tok"].single_thread()
    barrier.wait()  # the parent starts the clock once every worker is up


def _bare_encode(batch: int) -> int:
    size = _bare["batch_size"]
    return sum(map(len, _bare["tok"].encode_batch_native(_bare["texts"][batch * size : (batch + 1) * size])))


def bare_throughput(
    texts: list[str], tokenizer_type: str, tokenizer_model: str, workers: int, batch_size: int
) -> tuple[int, float]:
    """(text tokens, seconds) for encoding texts in batches by `workers` single-threaded processes."""
    batches = range((len(texts) + batch_size - 1) // batch_size)
    _bare.update(tok=build_tokenizer(tokenizer_type, tokenizer_model), texts=texts, batch_size=batch_size)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(workers + 1)
    try:
        with ctx.Pool(workers, _bare_init, (barrier,)) as pool:
            barrier.wait(timeout=120)
            t0 = time.perf_counter()
            tokens = sum(pool.imap_unordered(_bare_encode, batches))
            return tokens, time.perf_counter() - t0
    finally:
        _bare.clear()


def benchmark_preprocessing(
    inputs: list[str],
    tokenizer_type: str,
    tokenizer_model: str,
    workers: int = 1,
    max_docs: int | None = 2000,
    batch_size: int = 256,
    repeats: int = 3,
) -> dict:
    texts = [t for (t,) in itertools.islice(read_texts(inputs), max_docs)]
    bare_s = pipeline_s = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            bare_tokens, seconds = bare_throughput(texts, tokenizer_type, tokenizer_model, workers, batch_size)
            bare_s = min(bare_s, seconds)
            stats = preprocess(
                inputs, os.path.join(tmp, "bench"), tokenizer_type, tokenizer_model, workers=workers,
                max_docs=max_docs, batch_size=batch_size, overwrite=True, progress=False,
            )  # fmt: skip
            pipeline_s = min(pipeline_s, stats["seconds"])
    pipeline_tokens = stats["tokens"] - stats["docs"]  # minus one EOD per document
    if (stats["docs"], pipeline_tokens) != (len(texts), bare_tokens):
        raise RuntimeError(
            f"pipeline wrote {stats['docs']} docs / {pipeline_tokens} tokens, bare run {len(texts)} / {bare_tokens}"
        )
    bare_rate, pipeline_rate = bare_tokens / bare_s, pipeline_tokens / pipeline_s
    return dict(
        docs=len(texts),
        tokens=bare_tokens,
        mbytes=stats["bytes"] / 1e6,
        workers=workers,
        bare_seconds=bare_s,
        pipeline_seconds=pipeline_s,
        bare_tokens_per_s=bare_rate,
        pipeline_tokens_per_s=pipeline_rate,
        ratio=pipeline_rate / bare_rate,
    )
