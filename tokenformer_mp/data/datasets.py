"""Train/valid/test GPT datasets over megatron-core indexed datasets (.bin/.idx), blended by weight.

megatron-core does the work: GPTDataset packs documents into samples of seq_length + 1 tokens, and shuffles documents
and samples with the seed, so that within an epoch every sample is drawn once; BlendedDataset interleaves several
prefixes in proportion to their weights. Megatron builds the index files on rank 0, then the other ranks load them.

Caching: cache_dir holds the index files (.npy) and must be shared by all ranks. With cache_dir=None megatron
writes GPTDataset's index files to `<prefix>/cache/GPTDataset_indices/` beside the data, and does not cache blends.
megatron writes its cache in place and takes any file that exists as built; so rank 0 first checks every cached
array (npy header against file size) and removes torn or incomplete sets, then megatron builds into a staging
directory (holding links to the valid cached files), and the new files are renamed into cache_dir once complete.

Process group: BlendedDataset calls torch.distributed.get_rank() when it has a cache path. When the caller has no
process group, build_datasets creates a 1-process gloo group (in-memory store, no network) for the build and destroys
it afterwards, so a later torch.distributed.init_process_group by the caller still works.
"""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from tokenformer_mp.data.preprocess import pid_alive
from tokenformer_mp.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
# megatron's cache: "{md5}-{class}-{split}-{affix}", every affix of a class present once a set is built
CACHE_FILES = {"GPTDataset": {"description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"},
               "BlendedDataset": {"description.txt", "dataset_index.npy", "dataset_sample_index.npy"}}
CACHE_NAME = re.compile(r"^([0-9a-f]{32}-(GPTDataset|BlendedDataset)-[a-z]+)-(.+)$")
STAGING = ".build."


class GPTSamples(torch.utils.data.Dataset):
    """The first `size` samples of a megatron GPTDataset or BlendedDataset (`.dataset`), as dicts of SAMPLE_KEYS:
    tokens and labels (int64, [seq_length], labels = tokens shifted left by one), loss_mask (float32), position_ids
    (int64). Megatron's own lengths differ by case (a GPTDataset spans whole epochs, a blend may round up) and so do
    its keys (a blend adds dataset_id): this keeps both the same whatever the number of prefixes."""

    def __init__(self, dataset: torch.utils.data.Dataset, size: int) -> None:
        assert len(dataset) >= size, f"megatron built {len(dataset)} samples, {size} asked"
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} of {self.size}")
        sample = self.dataset[idx]
        return {key: sample[key] for key in SAMPLE_KEYS}


def npy_problem(path: str) -> str | None:
    """What is wrong with a .npy file (a header it cannot parse, a size its header does not account for), or None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            expected = f.tell() + math.prod(shape) * dtype.itemsize
    except (ValueError, OSError, EOFError) as e:
        return f"unreadable npy header ({e})"
    size = os.path.getsize(path)
    return None if size == expected else f"{size} bytes where its header says {expected} (a torn write)"


def validate_cache(cache_dir: str) -> list[str]:
    """Remove every cached index set in cache_dir with a torn or missing file, and staging directories that a killed
    build on this host left; a removed set is rebuilt. Returns the removed paths. One process (rank 0)."""
    sets: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    removed = []
    for name in sorted(os.listdir(cache_dir)):
        path = os.path.join(cache_dir, name)
        m = CACHE_NAME.match(name)
        if m:
            sets[(m.group(1), m.group(2))][m.group(3)] = path
        elif name.startswith(f"{STAGING}{socket.gethostname()}.") and not pid_alive(int(name.rsplit(".", 1)[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for (base, cls), files in sets.items():
        problems = [f"{a} missing" for a in sorted(CACHE_FILES[cls] - set(files))]
        problems += [f"{a}: {why}" for a, p in sorted(files.items()) if a.endswith(".npy") and (why := npy_problem(p))]
        if problems:
            logger.warning("data cache %s-*: %s; removed, it is rebuilt", os.path.join(cache_dir, base),
                           "; ".join(problems))
            for p in files.values():
                os.remove(p)
            removed += files.values()
    return removed


@contextmanager
def staged_cache(cache_dir: str) -> Iterator[str]:
    """Collective. A staging directory for megatron's index build, in cache_dir, holding links to its valid cached
    files (so those are hits); after the build, rank 0 renames the new files into cache_dir, arrays before the
    description that completes a set, so that a crash leaves only sets validate_cache removes."""
    staging = None
    if dist.get_rank() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        validate_cache(cache_dir)
        staging = os.path.join(cache_dir, f"{STAGING}{socket.gethostname()}.{os.getpid()}")
        os.makedirs(staging)
        for name in os.listdir(cache_dir):
            if CACHE_NAME.match(name):
                os.symlink(os.path.join(cache_dir, name), os.path.join(staging, name))
    box = [staging]
    dist.broadcast_object_list(box, src=0)
    try:
        yield box[0]
        dist.barrier()  # every rank has opened its files
        if dist.get_rank() == 0:
            new = [n for n in os.listdir(staging) if not os.path.islink(os.path.join(staging, n))]
            for name in sorted(new, key=lambda n: n.endswith("description.txt")):
                os.replace(os.path.join(staging, name), os.path.join(cache_dir, name))
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)


def check_prefix(prefix: str) -> None:
    missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"dataset prefix {prefix!r}: missing {' and '.join(missing)}")


@contextmanager
def _process_group() -> Iterator[None]:
    """The caller's process group if there is one, else a 1-process gloo group for the duration."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_datasets(
    prefixes: list[str],
    weights: list[float] | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    tokenizer: Tokenizer,
    cache_dir: str | None,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
) -> tuple[GPTSamples | None, GPTSamples | None, GPTSamples | None]:
    """(train, valid, test) with num_samples[i] samples each, from prefixes split by `split` (e.g. "98,1,1" of each
    prefix's documents); None for a split given no share. reset_position_ids, eod_mask_loss: megatron's
    (position ids restart after each EOD; the loss mask is 0 where the input is EOD).

    weights=None with several prefixes weighs each by its token count. Call on every rank when distributed.
    """
    for prefix in prefixes:
        check_prefix(prefix)
    if len(prefixes) == 1:
        weights = None  # a single prefix needs no BlendedDataset
    elif weights is None:
        weights = [float(IndexedDataset(p).sequence_lengths.sum(dtype=np.int64)) for p in prefixes]
    elif len(weights) != len(prefixes):
        raise ValueError(f"{len(weights)} weights for {len(prefixes)} prefixes")
    def build(path_to_cache: str | None) -> list:
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=(list(prefixes), None if weights is None else [float(w) for w in weights]),
            split=split,
            path_to_cache=path_to_cache,
            tokenizer=tokenizer,
            reset_position_ids=reset_position_ids,
            # Attention within documents (data.reset_attention_mask): the model masks it from the documents' EODs
            # (batches.document_ids), once per micro-batch instead of a [T, T] mask per sample from here.
            reset_attention_mask=False,
            eod_mask_loss=eod_mask_loss,
            create_attention_mask=False,
        )
        return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()

    with _process_group():
        if cache_dir is None:
            datasets = build(None)
        else:
            with staged_cache(os.path.abspath(cache_dir)) as staging:
                datasets = build(staging)
    return tuple(None if d is None else GPTSamples(d, n) for d, n in zip(datasets, num_samples))


# --- the index cache built once, before any process group ------------------------------------------------------

def cache_dir_of(cfg) -> str:
    return cfg.data.cache_dir or os.path.join(cfg.run_dir, "data_cache")


def sample_counts(cfg, dp: int) -> tuple[int, int, int]:
    """Samples the trainer reads from (train, valid, test) at `dp` data-parallel ranks."""
    G = cfg.train.global_batch(dp)
    return cfg.train.steps * G, max(1, cfg.train.eval_iters * G), 0


def _ready_marker(cfg, dp: int) -> str:
    d = cfg.data
    key = json.dumps([d.prefixes, d.weights, d.split, cfg.model.seq_length, cfg.train.seed, sample_counts(cfg, dp)])
    return os.path.join(cache_dir_of(cfg), f"ready-{hashlib.md5(key.encode()).hexdigest()}.json")


def build_cache(cfg, dp: int, tokenizer: Tokenizer) -> str:
    """Build (or check) megatron's index cache for a config at `dp` data-parallel ranks, in this process, without
    a process group, and mark it ready (tools/build_data_cache.py; the trainer's rank 0). Returns the marker."""
    start = time.perf_counter()
    build_datasets(cfg.data.prefixes, cfg.data.weights, cfg.data.split, cfg.model.seq_length, cfg.train.seed,
                   sample_counts(cfg, dp), tokenizer, cache_dir_of(cfg))
    marker = _ready_marker(cfg, dp)
    tmp = f"{marker}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"seconds": time.perf_counter() - start, "samples": sample_counts(cfg, dp)}, f)
    os.replace(tmp, marker)
    return marker


def wait_for_cache(cfg, dp: int, poll_s: float = 1.0, report_s: float = 60.0) -> float:
    """Wait, with no time limit, until the index cache for this config is marked ready (rank 0 builds it before
    the process group exists: a build of hours on the Pile is not a collective that times out). A rank 0 that dies
    ends the job through the launcher (srun --kill-on-bad-exit, torchrun). Returns the seconds waited."""
    marker, start, reported = _ready_marker(cfg, dp), time.perf_counter(), 0.0
    while not os.path.exists(marker):
        waited = time.perf_counter() - start
        if waited - reported >= report_s:
            logger.info("waiting for rank 0 to build the data index cache (%s): %.0f s", cache_dir_of(cfg), waited)
            reported = waited
        time.sleep(poll_s)
    return time.perf_counter() - start
