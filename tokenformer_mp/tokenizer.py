"""Tokenizers behind one small interface, usable by the preprocessing tools and by megatron-core's GPTDataset.

GPTDataset only reads `vocab_size`, `eod` and `pad` from its tokenizer, and serialises `unique_identifiers` into the
hash that names its index cache; it never tokenizes. So these classes duck-type that interface instead of subclassing
megatron's MegatronLegacyTokenizer, which is deprecated (it logs a warning on every construction) and demands
vocab/inv_vocab dictionaries we do not need.
"""

import os
from abc import ABC, abstractmethod
from collections import OrderedDict

TOKENIZER_TYPES = ("HFTokenizer", "SentencePieceTokenizer")


class Tokenizer(ABC):
    vocab_size: int  # number of ids, added tokens included
    eod: int  # appended after every document
    pad: int  # eod when the vocabulary has no pad token

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        # Part of megatron's cache key: same class, file and ids => same cached indices.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(model_path)])]
        )

    def _finish_init(self) -> None:
        self.unique_identifiers.update(vocab_size=self.vocab_size, eod=self.eod, pad=self.pad)

    def single_thread(self) -> None:
        """Stop the library's own batch threading: for worker processes that already fill the cores."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def encode_batch_native(self, texts: list[str]) -> list:
        """The library's fastest batch output (lists of ids, or numpy arrays where it can make them): preprocessing
        and its benchmark use this, so neither pays for a conversion the library can skip."""
        return self.encode_batch(texts)

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer(Tokenizer):
    """A HuggingFace `tokenizers` JSON file, e.g. GPT-NeoX-20B's."""

    EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>")
    PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]")

    def __init__(self, model_path: str) -> None:
        # here, as sentencepiece below: only the library in use is imported (17 ms; config imports this module, 80 ms)
        from tokenizers import Tokenizer as _HF

        super().__init__(model_path)
        self.tok = _HF.from_file(model_path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eod = self._first_id(self.EOD_TOKENS)
        if eod is None:
            raise ValueError(f"{model_path}: no end-of-document token (tried {', '.join(self.EOD_TOKENS)})")
        self.eod = eod
        pad = self._first_id(self.PAD_TOKENS)
        self.pad = eod if pad is None else pad
        self._finish_init()

    def _first_id(self, tokens: tuple[str, ...]) -> int | None:
        ids = [self.tok.token_to_id(t) for t in tokens]
        return next((i for i in ids if i is not None), None)

    def single_thread(self) -> None:
        # Read by `tokenizers` at every batch call; the process-wide setting suits a worker process.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The _fast variant skips computing character offsets, which we never use.
        return [e.ids for e in self.tok.encode_batch_fast(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model file; eod is its eos id (`</s>`)."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm  # here: 26 ms (measured), only where a SentencePiece model is used

        super().__init__(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.threads = -1  # for batch encoding; -1 = all cores
        self.vocab_size = self.sp.vocab_size()
        eod = self.sp.eos_id()
        if eod < 0:
            eod = self.sp.piece_to_id("</s>")
            if eod == self.sp.unk_id():
                raise ValueError(f"{model_path}: no eos id and no '</s>' piece")
        self.eod = eod
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else eod
        self._finish_init()

    def single_thread(self) -> None:
        self.threads = 1

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=self.threads)

    def encode_batch_native(self, texts: list[str]) -> list:
        # int32 arrays straight from C++: no Python int per token (12% faster than lists, measured)
        return self.sp.encode(list(texts), return_type="numpy", num_threads=self.threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def build_tokenizer(tokenizer_type: str, model_path: str) -> Tokenizer:
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{tokenizer_type} model file not found: {model_path}")
    cls = HFTokenizer if tokenizer_type == "HFTokenizer" else SentencePieceTokenizer
    try:
        return cls(model_path)
    except ValueError:
        raise
    except Exception as e:  # the libraries' own: tokenizers raises a bare Exception, sentencepiece RuntimeError/OSError
        kind = "a tokenizers JSON file (tokenizer.json)" if cls is HFTokenizer else "a SentencePiece .model file"
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{model_path}: not {kind}, as tokenizer type {tokenizer_type} needs ({cause})") from None
