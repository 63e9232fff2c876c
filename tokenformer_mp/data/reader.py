"""Streaming reader of .jsonl and .jsonl.zst files (the Pile's format): yields the texts under given JSON keys.

Bad lines are skipped and counted, and the first few are logged as `file:line: reason`; with strict=True the first
one raises instead. A damaged .zst stream counts as one bad line where it breaks, and the file is left there.
"""

import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


class BadLine(ValueError):
    pass


@dataclass
class ReadStats:
    docs: int = 0
    bad_lines: int = 0
    bytes: int = 0  # UTF-8 bytes of the texts yielded
    first_bad: str = ""  # file:line: reason of the first bad line
    damaged: list[str] = field(default_factory=list)  # compressed streams cut short: where, and what was lost


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files named or matched by glob patterns, each pattern's matches sorted so runs are reproducible."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no input file matches {pattern!r}")
            files += matches
        elif os.path.isfile(pattern):
            files.append(pattern)
        elif os.path.isdir(pattern):
            raise IsADirectoryError(f"input {pattern} is a directory, not a file: name its files, e.g. "
                                    f"'{os.path.join(pattern, '*.jsonl.zst')}' (quoted)")
        else:
            raise FileNotFoundError(f"input file not found: {pattern}")
    return files


def _zst_chunks(f) -> Iterator[bytes]:
    """Decompressed chunks of every frame in f. zstandard's stream_reader silently stops at a truncated frame, so
    decompress frame by frame and raise if the input ends inside one."""
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, size, got = dctx.decompressobj(), False, -1, 0
    while data := f.read(CHUNK_BYTES):
        while data:
            if not in_frame:  # a frame starts: its header may say how large it decompresses (-1: it does not)
                in_frame, got = True, 0
                try:
                    size = zstandard.frame_content_size(data)
                except zstandard.ZstdError:
                    size = -1
            if out := dobj.decompress(data):
                got += len(out)
                yield out
            if not dobj.eof:
                break
            data, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
    if in_frame:
        lost = f"{size - got:,} of the frame's {size:,} bytes lost" if size >= 0 else "the rest of the frame lost"
        raise zstandard.ZstdError(f"stream ends inside a frame (truncated file): {got:,} bytes decompressed, {lost}")


def iter_lines(path: str) -> Iterator[bytes]:
    """Raw lines of a .jsonl or .jsonl.zst file, without their newlines."""
    with open(path, "rb") as f:
        chunks = _zst_chunks(f) if path.endswith(".zst") else iter(lambda: f.read(CHUNK_BYTES), b"")
        tail = b""
        for chunk in chunks:
            *lines, tail = (tail + chunk).split(b"\n")
            yield from lines
        if tail:
            yield tail


def _parse(line: bytes, keys: tuple[str, ...]) -> tuple[str, ...]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadLine(f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadLine(f"invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"a JSON {type(obj).__name__}, not an object")
    texts = []
    for key in keys:
        if key not in obj:
            raise BadLine(f"missing key {key!r}")
        if not isinstance(obj[key], str):
            raise BadLine(f"key {key!r} holds a {type(obj[key]).__name__}, not a string")
        texts.append(obj[key])
    return tuple(texts)


def read_texts(
    inputs: Iterable[str],
    json_keys: Iterable[str] = ("text",),
    strict: bool = False,
    stats: ReadStats | None = None,
    max_reported: int = 10,
) -> Iterator[tuple[str, ...]]:
    """Yield one tuple of texts (in json_keys order) per good line of the files named or globbed by inputs.

    Pass a ReadStats to have it counted into as the generator runs. Blank lines are neither documents nor bad.
    """
    keys = tuple(json_keys)
    stats = ReadStats() if stats is None else stats

    def bad(path: str, lineno: int, reason: str) -> None:
        where = f"{path}:{lineno}: {reason}"
        if strict:
            raise BadLine(where)
        stats.bad_lines += 1
        stats.first_bad = stats.first_bad or where
        if stats.bad_lines <= max_reported:
            logger.warning("skipped %s", where)
        elif stats.bad_lines == max_reported + 1:
            logger.warning("more bad lines: counted, not reported")

    for path in expand_inputs(inputs):
        lineno, docs_before = 0, stats.docs
        try:
            for lineno, line in enumerate(iter_lines(path), 1):
                if not line.strip():
                    continue
                try:
                    texts = _parse(line, keys)
                    # Lone surrogates (from JSON escapes like "\ud800") parse but cannot be encoded or tokenized.
                    size = sum(len(t.encode("utf-8")) for t in texts)
                except BadLine as e:
                    bad(path, lineno, str(e))
                    continue
                except UnicodeEncodeError:
                    bad(path, lineno, "text holds a lone surrogate (invalid unicode)")
                    continue
                stats.docs += 1
                stats.bytes += size
                yield texts
        except zstandard.ZstdError as e:
            stats.damaged.append(f"{path}: corrupt or truncated zstd stream after line {lineno} "
                                 f"({stats.docs - docs_before} documents read from it): {e}")
            bad(path, lineno + 1, f"corrupt zstd stream, rest of file skipped ({e})")
