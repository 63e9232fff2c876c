"""Random-token datasets with the trainer's sample format: speed does not depend on content."""
from __future__ import annotations

import torch


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (num_samples, seq_length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.data[i, :-1], "labels": self.data[i, 1:], "loss_mask": torch.ones(self.data.shape[1] - 1)}


class FixedVocab:
    """A stand-in tokenizer: only its sizes matter to the trainer."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.pad = vocab_size, 0, 0
