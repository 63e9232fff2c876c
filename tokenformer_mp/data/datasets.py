"""Train/valid/test GPT datasets over megatron-core indexed datasets (.bin/.idx), blended by weight.

megatron-core does the work: GPTDataset packs documents into samples of seq_length + 1 tokens, and shuffles documents
and samples with the seed, so that within an epoch every sample is drawn once; BlendedDataset interleaves several
prefixes in proportion to their weights. Megatron builds the index files on rank 0, then the other ranks load them.

Caching: cache_dir holds the index files (.npy) and must be shared by all ranks. With cache_dir=None megatron
writes GPTDataset's index files to `<prefix>/cache/GPTDataset_indices/` beside the data, and does not cache blends.

Process group: BlendedDataset calls torch.distributed.get_rank() when it has a cache path. When the caller has no
process group, build_datasets creates a 1-process gloo group (in-memory store, no network) for the build and destroys
it afterwards, so a later torch.distributed.init_process_group by the caller still works.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from tokenformer_mp.tokenizer import Tokenizer

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


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
) -> tuple[GPTSamples | None, GPTSamples | None, GPTSamples | None]:
    """(train, valid, test) with num_samples[i] samples each, from prefixes split by `split` (e.g. "98,1,1" of each
    prefix's documents); None for a split given no share.

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
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), None if weights is None else [float(w) for w in weights]),
        split=split,
        path_to_cache=None if cache_dir is None else os.path.abspath(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model applies its causal mask itself
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    with _process_group():
        datasets = builder.build()
    return tuple(None if d is None else GPTSamples(d, n) for d, n in zip(datasets, num_samples))
