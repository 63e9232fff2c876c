"""Any checkpoint -> a Hugging Face directory: config.json (auto_map), the modeling code beside it, model.safetensors
and the tokenizer, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)` load it without this project installed."""
from __future__ import annotations

import os
import shutil

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizerObject
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from ..config import ModelConfig
from ..fileio import atomic_dir
from ..inference import DTYPES, hf_config_dict, load_model, tokenizer_for
from ..tokenizer import HFTokenizer, Tokenizer
from .configuration_tokenformer import TokenFormerConfig
from .modeling_tokenformer import TokenFormerForCausalLM


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> TokenFormerConfig:
    ids = {} if tokenizer is None else {"bos_token_id": tokenizer.eod, "eos_token_id": tokenizer.eod,
                                        "pad_token_id": tokenizer.pad}
    return TokenFormerConfig(**hf_config_dict(cfg), **ids)


def hf_model(model, tokenizer: Tokenizer | None = None) -> TokenFormerForCausalLM:
    """The Hugging Face twin of a plain TokenFormer, sharing its parameter tensors (names: 'model.' + ours)."""
    with torch.device("meta"):
        hf = TokenFormerForCausalLM(hf_config(model.cfg, tokenizer))
    hf.load_state_dict({f"model.{k}": v for k, v in model.named_parameters()}, strict=True, assign=True)
    return hf.eval()


def sentencepiece_to_tokenizers(model_path: str) -> HFTokenizerObject:
    """A SentencePiece BPE model as a `tokenizers` BPE with the same ids and text, for the settings
    tools/train_tokenizer.py writes (identity normalisation, whitespace kept, byte fallback); others are refused
    by name. The merges are SentencePiece's pieces by score: its BPE merges the best-scoring pair first."""
    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    t, n = proto.trainer_spec, proto.normalizer_spec
    wanted = {"trainer_spec.model_type": (pb.TrainerSpec.ModelType.Name(t.model_type), "BPE"),
              "trainer_spec.byte_fallback": (t.byte_fallback, True),
              "trainer_spec.split_by_whitespace": (t.split_by_whitespace, True),
              "trainer_spec.treat_whitespace_as_suffix": (t.treat_whitespace_as_suffix, False),
              "normalizer_spec.name": (n.name, "identity"),
              "normalizer_spec.remove_extra_whitespaces": (n.remove_extra_whitespaces, False),
              "normalizer_spec.escape_whitespaces": (n.escape_whitespaces, True)}
    bad = [f"{k} = {have} (converted: {want})" for k, (have, want) in wanted.items() if have != want]
    if any(p.type == pb.ModelProto.SentencePiece.USER_DEFINED for p in proto.pieces):
        bad.append("user-defined pieces (not converted)")
    if bad:
        raise ValueError(f"{model_path}: cannot convert this SentencePiece model to a Hugging Face tokenizer: "
                         + "; ".join(bad))
    sp = spm.SentencePieceProcessor(model_file=model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {p: i for p, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = sorted(((-sp.get_score(i), normal[p[:k]], normal[p[k:]], p[:k], p[k:])
                     for p, i in normal.items() for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal))
    tok = HFTokenizerObject(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], byte_fallback=True,
                                unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True))
    escape = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if n.add_dummy_prefix else []) + escape)
    # SentencePiece's words: a run of whitespace and the text after it (a lone run with allow_whitespace_only_pieces)
    word = "▁+[^▁]*|[^▁]+" if t.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    strip = [decoders.Strip(" ", 1, 0)] if n.add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def hf_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """The project's tokenizer as a transformers one giving the same ids. Its end-of-document id serves as eos,
    bos (a document starts after the previous one's end) and pad where the vocabulary has none."""
    if isinstance(tokenizer, HFTokenizer):
        obj, name, split = tokenizer.tok, tokenizer.tok.id_to_token, False
    else:
        obj, name = sentencepiece_to_tokenizers(tokenizer.model_path), tokenizer.sp.id_to_piece
        split = True  # SentencePiece reads "</s>" in text as characters, not as the control id
    return PreTrainedTokenizerFast(tokenizer_object=obj, eos_token=name(tokenizer.eod), bos_token=name(tokenizer.eod),
                                   pad_token=name(tokenizer.pad), model_max_length=max_length,
                                   split_special_tokens=split)


def export_hf(path: str, out_dir: str, dtype: str = "fp32", tokenizer_type: str | None = None,
              tokenizer_model: str | None = None) -> str:
    """Write the Hugging Face directory for any checkpoint or export (written whole under a temporary name)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    model, config = load_model(path)  # fp32: the cast below is the export's only rounding
    tok = tokenizer_for(config, tokenizer_type, tokenizer_model)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, more than the model's {model.cfg.vocab_size} rows")
    hf = hf_model(model, tok).to(DTYPES[dtype])
    TokenFormerConfig.register_for_auto_class()
    TokenFormerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp)  # config.json with auto_map, both code files copied beside it, model.safetensors
        hf_tokenizer(tok, model.cfg.seq_length).save_pretrained(tmp)
        if isinstance(tok, HFTokenizer):
            shutil.copyfile(tok.model_path, os.path.join(tmp, "tokenizer.json"))  # the file itself, byte for byte
    return out_dir
