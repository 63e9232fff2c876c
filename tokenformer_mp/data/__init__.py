"""Data pipeline: read Pile-format JSONL, tokenize into megatron-core .bin/.idx files, build GPT datasets.

Kept free of torch/megatron imports so that tokenizer worker processes start light.
"""

from tokenformer_mp.data.reader import ReadStats, expand_inputs, read_texts

__all__ = ["ReadStats", "expand_inputs", "read_texts"]
