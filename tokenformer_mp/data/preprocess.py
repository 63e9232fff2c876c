"""Tokenize Pile-format JSONL into megatron-core indexed datasets: `{output_prefix}_{key}_document.bin/.idx`.

The main process reads and writes while `workers` single-threaded processes tokenize batches of documents with the
tokenizer's batch API. A worker writes each batch's tokens as one flat array to a scratch file (local temp dir) and
sends back only the document lengths: pickling megabytes of tokens through the pool's pipe cost more than the
tokenizer's own output conversion (measured: 7% of a fast tokenizer's time). Output is written under temporary
names and renamed into place only once complete, and only if it holds a document with a token besides EOD; the next
run of the same output, even one then refused, removes the temporary files and scratch directory a killed run left
(its process gone, or a zombie).
"""

import glob
import hashlib
import itertools
import logging
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from tokenformer_mp.data.reader import ReadStats, expand_inputs, read_texts
from tokenformer_mp.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

Encoded = tuple[np.ndarray, np.ndarray]  # (all tokens of a batch, flat; length of each document)


def token_dtype(vocab_size: int) -> type[np.number]:
    return DType.optimal_dtype(vocab_size)  # uint16 below 65500 ids, else int32


def encode_to_arrays(tok: Tokenizer, texts: list[str], append_eod: bool, dtype: type[np.number]) -> Encoded:
    docs = tok.encode_batch_native(texts)
    lengths = np.fromiter(map(len, docs), np.int64, len(docs)) + int(append_eod)
    if docs and isinstance(docs[0], np.ndarray):
        eod = np.array([tok.eod], dtype=docs[0].dtype)
        parts = [x for d in docs for x in (d, eod)] if append_eod else docs
        return np.concatenate(parts).astype(dtype, copy=False), lengths
    if append_eod:
        for ids in docs:
            ids.append(tok.eod)
    return np.fromiter(itertools.chain.from_iterable(docs), dtype, int(lengths.sum())), lengths


# Worker-process state, set once by _init_worker rather than pickled with every batch.
_worker: dict = {}


def _init_worker(tok: Tokenizer, append_eod: bool, dtype: type[np.number], scratch: str) -> None:
    tok.single_thread()
    _worker.update(tok=tok, eod=append_eod, dtype=dtype, scratch=scratch)


def _encode_columns(job: tuple[int, list[list[str]]]) -> list[tuple[str, np.ndarray]]:
    """One batch: (scratch file holding the flat tokens, document lengths) per json key."""
    index, columns = job
    out = []
    for k, texts in enumerate(columns):
        flat, lengths = encode_to_arrays(_worker["tok"], texts, _worker["eod"], _worker["dtype"])
        path = os.path.join(_worker["scratch"], f"{index}.{k}.bin")
        with _naming(path):
            flat.tofile(path)
        out.append((path, lengths))
    return out


@contextmanager
def _naming(path: str) -> Iterator[None]:
    """An OSError from writing (a full disk: numpy and write() leave the file unnamed) carries the path."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        # numpy reports a short write without an errno ("N requested and M written"): a full disk, mostly
        raise OSError(e.errno, e.strerror or f"write failed, {e} (is the disk full?)", path) from None


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (leftovers of a dead one may be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie (killed, not yet reaped by its parent: a script's Popen never waited on) answers kill(0) too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False
    except OSError:  # no /proc: kill(0)'s answer
        return True


def scratch_prefix(output_prefix: str) -> str:
    """Scratch directories of this output are named after it (and the writing process): a rerun finds what a killed
    run left."""
    path = os.path.abspath(output_prefix)
    return f"tokenformer_mp_preprocess.{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:10]}."


def remove_leftovers(output_prefix: str, prefixes: Iterable[str]) -> list[str]:
    """Temporary outputs ({prefix}.tmpPID.bin/.idx) and scratch directories that a killed earlier run of this output
    left behind (their process is gone); returns what was removed."""
    removed = []
    found = [(p, re.search(r"\.tmp(\d+)\.(?:bin|idx)$", p)) for prefix in prefixes
             for p in glob.glob(glob.escape(prefix) + ".tmp*")]
    found += [(p, re.search(r"\.(\d+)\.[^.]+$", p))
              for p in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(scratch_prefix(output_prefix)) + "*"))]
    for path, m in found:
        if m is not None and not pid_alive(int(m.group(1))):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
            logger.warning("removed %s, left by a killed earlier run of this output", path)
    return removed


def _take(path: str, dtype: type[np.number]) -> np.ndarray:
    flat = np.fromfile(path, dtype)
    os.remove(path)
    return flat


def ordered_map(pool, fn: Callable, items: Iterable, max_pending: int) -> Iterator:
    """pool.imap with back-pressure: imap would read the whole input into its queue ahead of the workers."""
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def batched_columns(rows: Iterable[tuple[str, ...]], batch_size: int) -> Iterator[list[list[str]]]:
    """Batches of rows (one text per json key), transposed to one list of texts per key."""
    it = iter(rows)
    while batch := list(itertools.islice(it, batch_size)):
        yield [list(col) for col in zip(*batch)]


def output_prefixes(output_prefix: str, json_keys: Iterable[str]) -> dict[str, str]:
    return {key: f"{output_prefix}_{key}_document" for key in json_keys}


class _AtomicIndexedDataset:
    """An IndexedDatasetBuilder writing to temporary names; commit() renames both files into place."""

    def __init__(self, prefix: str, dtype: type[np.number]) -> None:
        self.prefix, self.tmp = prefix, f"{prefix}.tmp{os.getpid()}"
        self.builder = IndexedDatasetBuilder(self.tmp + ".bin", dtype=dtype)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """A batch of documents, each one sequence: what add_document does per document, in one write."""
        b = self.builder
        with _naming(self.tmp + ".bin"):
            b.add_document(tokens, lengths.tolist())  # every sequence, then a single document end ...
        n = len(b.sequence_lengths)
        b.document_indices[-1:] = range(n - len(lengths) + 1, n + 1)  # ... which becomes one end per sequence

    def commit(self) -> None:
        with _naming(self.tmp + ".bin"):
            self.builder.data_file.flush()
        with _naming(self.tmp + ".idx"):
            self.builder.finalize(self.tmp + ".idx")
        # Drop the old .idx first: a crash between the renames then leaves a lone .bin (no dataset), never a
        # new .bin paired with a stale .idx.
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def discard(self) -> None:
        try:
            self.builder.data_file.close()
        except OSError:  # a full disk fails the final flush too
            pass
        for ext in (".bin", ".idx"):
            if os.path.exists(self.tmp + ext):
                os.remove(self.tmp + ext)


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    json_keys: Iterable[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    batch_size: int = 256,
    max_docs: int | None = None,
    progress: bool = True,
    allow_truncated: bool = False,
) -> dict:
    """Tokenize every document of `inputs` (files or globs) into one indexed dataset per json key.

    `workers` single-threaded processes tokenize while this one reads and writes. Returns counts: docs, tokens (all
    keys, EOD included), bad_lines, bytes (UTF-8 text read), damaged (compressed inputs cut short: allowed only with
    allow_truncated), seconds, and the output prefixes by key. No document read: ValueError, nothing written.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    t0 = time.perf_counter()
    json_keys = tuple(json_keys)
    prefixes = output_prefixes(output_prefix, json_keys)
    remove_leftovers(output_prefix, prefixes.values())  # first: also when this run is refused below
    files = expand_inputs(inputs)
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = token_dtype(tok.vocab_size)
    for prefix in prefixes.values():
        for path in (prefix + ".bin", prefix + ".idx"):
            if os.path.exists(path) and not overwrite:
                raise FileExistsError(f"output {path} exists; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    stats = ReadStats()
    rows = itertools.islice(read_texts(files, json_keys, strict=strict, stats=stats), max_docs)
    read_bytes = deque()  # stats.bytes once each batch was read: the reader runs ahead of what is tokenized

    def batches() -> Iterator[list[list[str]]]:
        for columns in batched_columns(rows, batch_size):
            if stats.damaged and not allow_truncated:
                raise ValueError(f"{stats.damaged[0]}; pass --allow-truncated to keep the documents before the damage")
            read_bytes.append(stats.bytes)
            yield columns
        if stats.damaged and not allow_truncated:
            raise ValueError(f"{stats.damaged[0]}; pass --allow-truncated to keep the documents before the damage")
        if stats.docs == 0:
            raise ValueError(f"no documents read from {', '.join(files)} ({stats.bad_lines} bad lines"
                             + (f"; the first: {stats.first_bad}" if stats.first_bad else "") + "): an empty file, "
                             f"wrong --json-keys ({', '.join(json_keys)}), or a compressed file not named .zst "
                             f"(or the reverse)? Nothing written")

    outputs: dict[str, _AtomicIndexedDataset] = {}
    # local temp dir (not the output's file system), named after the output so that a rerun finds a killed run's
    scratch = tempfile.mkdtemp(prefix=f"{scratch_prefix(output_prefix)}{os.getpid()}.")
    # fork: workers start in milliseconds and inherit the loaded tokenizer, re-importing nothing.
    pool = mp.get_context("fork").Pool(workers, _init_worker, (tok, append_eod, dtype, scratch))
    try:
        for key, prefix in prefixes.items():
            outputs[key] = _AtomicIndexedDataset(prefix, dtype)
        tokens, filled = 0, dict.fromkeys(json_keys, 0)  # documents with a token besides EOD, by key
        with tqdm(unit="doc", disable=None if progress else True, desc="tokenize") as bar:  # None: a terminal only
            for columns in ordered_map(pool, _encode_columns, enumerate(batches()), max_pending=4 * workers):
                for key, (path, lengths) in zip(json_keys, columns):
                    flat = _take(path, dtype)
                    outputs[key].add(flat, lengths)
                    tokens += len(flat)
                    filled[key] += int((lengths > int(append_eod)).sum())
                bar.update(len(columns[0][1]))
                mb_per_s = read_bytes.popleft() / 1e6 / (time.perf_counter() - t0)
                bar.set_postfix_str(f"{mb_per_s:.1f} MB/s", refresh=False)
        for key, n in filled.items():
            if n == 0:  # a dataset of EOD tokens only would train on nothing
                raise ValueError(f"every document read from {', '.join(files)} has an empty {key!r} "
                                 f"({stats.docs} documents, no tokens): nothing written")
        for out in outputs.values():
            out.commit()
    except BaseException:
        for out in outputs.values():
            out.discard()
        raise
    finally:
        pool.terminate()
        shutil.rmtree(scratch, ignore_errors=True)
    return dict(
        docs=stats.docs,
        tokens=tokens,
        bad_lines=stats.bad_lines,
        bytes=stats.bytes,
        damaged=stats.damaged,
        seconds=time.perf_counter() - t0,
        outputs=prefixes,
    )
