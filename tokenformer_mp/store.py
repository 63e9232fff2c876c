"""The layout-free tensor store under every checkpoint: each tensor (its weight, exp_avg, exp_avg_sq) is a set of
segments of its flat, row-major index space, spread over any number of safetensors files, each segment's bytes
hashed in blocks of BLOCK_BYTES as they are written.

A training rank writes the segments it owns (its ZeRO partition of its tensor-parallel shard: each element once,
1/(TP x DP) of the state per rank); an offline tool writes one segment per tensor. A reader asks for any range of a
tensor's flat index (a TP shard's rows, a ZeRO fragment), reads only the blocks that cover it and checks each against
its hash: a rank reads its own share, and a flipped or missing byte anywhere it reads is an error naming the tensor
and the file, never a wrong model.

Manifest entry of a tensor: {"shape": [...], "dtype": "float32", "keys": [...], "segments": {key: [{"start": s,
"length": n, "file": f, "entry": e, "blocks": [sha256, ...]}]}}; of a file: {"size": bytes, "header_sha256": ...}.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import torch

BLOCK_BYTES = 1 << 20
_DTYPES = {torch.float32: "F32", torch.uint8: "U8"}
_TORCH = {v: k for k, v in _DTYPES.items()}


class StoreError(RuntimeError):
    """A store that cannot give what was asked (corrupt, truncated, incomplete); names the tensor and the file."""


def entry_name(name: str, key: str, start: int) -> str:
    return f"{name}/{key}/{start}"


def block_hashes(view: memoryview) -> list[str]:
    return [hashlib.sha256(view[i:i + BLOCK_BYTES]).hexdigest() for i in range(0, len(view), BLOCK_BYTES)]


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.detach().contiguous().view(-1).numpy()).cast("B")


def write_shard(path: str, tensors: list[tuple[str, torch.Tensor]]) -> dict:
    """One safetensors file from (entry, contiguous CPU tensor) pairs, in one pass: the header, then each tensor's
    bytes, hashed block by block as written. Written under a temporary name and renamed when complete. Returns
    {"size", "header_sha256", "blocks": {entry: [sha256, ...]}}."""
    header, offset = {}, 0
    for entry, t in tensors:
        n = t.numel() * t.element_size()
        header[entry] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data 8-byte aligned, as safetensors writes it
    prefix = struct.pack("<Q", len(head)) + head
    blocks, tmp = {}, f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(prefix)
        for entry, t in tensors:
            view = _bytes_of(t)
            blocks[entry] = block_hashes(view)
            f.write(view)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": len(prefix) + offset, "header_sha256": hashlib.sha256(prefix).hexdigest(), "blocks": blocks}


class Store:
    """Reads ranges of a layout-free checkpoint's tensors, verifying every block it reads. `bytes_read` counts the
    bytes taken from disk (headers included)."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest, self.bytes_read = path, manifest, 0
        self._headers: dict[str, tuple[int, dict]] = {}

    def _pread(self, file: str, offset: int, size: int, what: str) -> bytes:
        path = os.path.join(self.path, file)
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), size, offset)
        except OSError as e:
            raise StoreError(f"{path}: {what}: cannot read it ({e.strerror})") from None
        self.bytes_read += len(data)
        if len(data) != size:
            raise StoreError(f"{path}: {what}: {len(data)} of {size} bytes at offset {offset}: the file is truncated")
        return data

    def _header(self, file: str, what: str) -> tuple[int, dict]:
        """(where the data starts, the safetensors header) of a file, its bytes checked against the manifest."""
        if file not in self._headers:
            path, info = os.path.join(self.path, file), self.manifest["files"].get(file)
            if info is None:
                raise StoreError(f"{path}: {what}: the file is not in the manifest")
            (n,) = struct.unpack("<Q", self._pread(file, 0, 8, what))
            if n > info["size"]:
                raise StoreError(f"{path}: {what}: header length {n} is past the file's size: the file is corrupt")
            prefix = struct.pack("<Q", n) + self._pread(file, 8, n, what)
            if hashlib.sha256(prefix).hexdigest() != info["header_sha256"]:
                raise StoreError(f"{path}: {what}: header checksum mismatch: the file is corrupt")
            self._headers[file] = (8 + n, json.loads(prefix[8:]))
        return self._headers[file]

    def _segment_range(self, what: str, seg: dict, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of a tensor from one of its segments, reading and checking the blocks that hold them."""
        file = seg["file"]
        data_start, header = self._header(file, what)
        entry = header.get(seg["entry"])
        if entry is None:
            raise StoreError(f"{os.path.join(self.path, file)}: {what}: entry {seg['entry']} is missing")
        dtype = _TORCH[entry["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        length = seg["length"] * size
        a, b = (lo - seg["start"]) * size, (hi - seg["start"]) * size
        first, last = a // BLOCK_BYTES, math.ceil(b / BLOCK_BYTES)
        start, end = first * BLOCK_BYTES, min(last * BLOCK_BYTES, length)
        data = self._pread(file, data_start + entry["data_offsets"][0] + start, end - start, what)
        view = memoryview(data)
        for i, k in enumerate(range(first, last)):
            if hashlib.sha256(view[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]).hexdigest() != seg["blocks"][k]:
                raise StoreError(f"{os.path.join(self.path, file)}: {what}: checksum mismatch in bytes "
                                 f"{k * BLOCK_BYTES}-{min((k + 1) * BLOCK_BYTES, length)} of {seg['entry']}: corrupt")
        return torch.frombuffer(bytearray(view[a - start:b - start]), dtype=dtype)

    def read(self, name: str, key: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of a tensor's flat index, a 1-D CPU tensor."""
        segments = self.manifest["tensors"][name]["segments"].get(key)
        if segments is None:
            raise StoreError(f"{self.path}: tensor {name} has no {key}")
        parts, at = [], start
        for seg in sorted(segments, key=lambda s: s["start"]):
            lo, hi = max(at, seg["start"]), min(end, seg["start"] + seg["length"])
            if lo >= hi:
                continue
            if lo != at:
                break
            parts.append(self._segment_range(f"tensor {name} ({key})", seg, lo, hi))
            at = hi
        if at != end:
            raise StoreError(f"{self.path}: tensor {name} ({key}): elements {at}-{end} are in no file: incomplete")
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def rows(self, name: str, key: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of a tensor, shaped."""
        shape = self.manifest["tensors"][name]["shape"]
        row = math.prod(shape[1:])
        return self.read(name, key, first * row, last * row).view([last - first] + shape[1:])

    def full(self, name: str, key: str = "weight") -> torch.Tensor:
        shape = self.manifest["tensors"][name]["shape"]
        return self.rows(name, key, 0, shape[0]) if shape else self.read(name, key, 0, 1).view([])

    def rank_state(self, rank: int) -> dict[str, torch.Tensor]:
        """The RNG states the rank saved (uint8 tensors by generator: torch, cuda), {} when it saved none."""
        segs = (self.manifest.get("rank_state") or {}).get(str(rank), {})
        return {k: self._segment_range(f"rank {rank}'s RNG state ({k})", seg, 0, seg["length"]) for k, seg in segs.items()}

    def verify(self) -> int:
        """Read and check every block of every segment (inspect_checkpoint --verify); returns the bytes checked."""
        before = self.bytes_read
        for name, e in self.manifest["tensors"].items():
            for key in e["segments"]:
                n = math.prod(e["shape"])
                self.read(name, key, 0, n)
        for rank in (self.manifest.get("rank_state") or {}):
            self.rank_state(int(rank))
        return self.bytes_read - before


def segments_of(file: str, written: dict, items: list[tuple[str, str, int, torch.Tensor]]) -> list[tuple]:
    """(name, key, segment) for each (name, key, start, tensor) written to `file` by write_shard."""
    return [(name, key, {"start": start, "length": t.numel(), "file": file, "entry": entry_name(name, key, start),
                         "blocks": written["blocks"][entry_name(name, key, start)]})
            for name, key, start, t in items]


def table(shapes: dict[str, list[int]], segments: list[tuple[str, str, dict]]) -> dict:
    """The manifest's tensors table from every tensor's shape and every segment written (from any rank)."""
    out = {name: {"shape": list(shape), "dtype": "float32", "keys": [], "segments": {}}
           for name, shape in sorted(shapes.items())}
    for name, key, seg in segments:
        out[name]["segments"].setdefault(key, []).append(seg)
    for e in out.values():
        e["keys"] = sorted(e["segments"])
        for segs in e["segments"].values():
            segs.sort(key=lambda s: s["start"])
    return out
