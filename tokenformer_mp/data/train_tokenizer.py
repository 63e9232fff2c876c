"""Train a SentencePiece BPE model on Pile-format JSONL, fed line by line from the streaming reader.

The model is lossless on any text: identity normalisation, whitespace kept as is, and byte fallback for characters
outside the vocabulary (newlines included, since SentencePiece trains on single lines).
"""

import itertools
import os
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from .reader import read_texts

# The ids are fixed so that every model agrees: unk must exist for byte fallback; eos is the end-of-document id.
SPECIAL_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)
MAX_SENTENCE_BYTES = 1 << 14  # longer lines are dropped by SentencePiece itself


def sentences(inputs: Iterable[str], json_keys: Iterable[str] = ("text",)) -> Iterator[str]:
    """Non-blank lines of every text."""
    for texts in read_texts(inputs, json_keys):
        for text in texts:
            yield from (line for line in text.split("\n") if line.strip())


def train_tokenizer(
    inputs: list[str],
    model_prefix: str,
    vocab_size: int,
    json_keys: Iterable[str] = ("text",),
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.9995,
    threads: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write `{model_prefix}.model` and `.vocab` from the first `max_sentences` lines; return the .model path."""
    final = {ext: f"{model_prefix}.{ext}" for ext in ("model", "vocab")}
    for path in final.values():
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"output {path} exists; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp = f"{model_prefix}.tmp{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.islice(sentences(inputs, json_keys), max_sentences),
            model_prefix=tmp,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads or os.cpu_count(),
            minloglevel=2,  # warnings and errors only
            **SPECIAL_IDS,
        )
        for ext, path in final.items():
            os.replace(f"{tmp}.{ext}", path)
    finally:
        for ext in final:
            if os.path.exists(f"{tmp}.{ext}"):
                os.remove(f"{tmp}.{ext}")
    return final["model"]
