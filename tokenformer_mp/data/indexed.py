"""A megatron-core indexed dataset (.idx/.bin) checked before it is used: header, counts and file sizes.

megatron-core asserts on a bad header and reads whatever a truncated file holds (an AttributeError or a numpy error
much later); this reads the 34-byte header and the last sequence's entry and says what is wrong, naming the file.
Kept free of megatron imports: the config validation calls it.
"""

import os
import struct

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
HEADER_BYTES = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron's DType codes -> bytes per token


def check_indexed_dataset(prefix: str) -> int:
    """Raise ValueError naming the file unless prefix.idx is a megatron index whose counts match its own size and
    the size of prefix.bin. Returns the number of sequences (documents)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ValueError(f"{idx}: not a megatron-core index (bad header; made by tools/preprocess_data.py?)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in DTYPE_SIZES:
            raise ValueError(f"{idx}: unknown index version {version} or token type code {code}")
        expected = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc  # lengths int32, pointers int64, documents int64
        if size != expected:
            raise ValueError(f"{idx}: {size} bytes, but its header counts {n_seq} sequences and {n_doc} document boundaries "
                             f"({expected} bytes): truncated or corrupt")
        if n_seq == 0:
            raise ValueError(f"{idx}: the dataset holds no documents")
        # the .bin ends where the last sequence does: its byte offset (pointers[-1]) plus its length; O(1) reads,
        # not the whole index (the Pile's is 2.5 GB)
        f.seek(HEADER_BYTES + 4 * (n_seq - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(HEADER_BYTES + 4 * n_seq + 8 * (n_seq - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    expected = last_pointer + last_length * DTYPE_SIZES[code]
    if os.path.getsize(bin_) != expected:
        raise ValueError(f"{bin_}: {os.path.getsize(bin_)} bytes, but {idx} says its sequences end at byte {expected}: "
                         f"truncated, or not the pair of this index")
    return n_seq
