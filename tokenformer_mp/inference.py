"""Load any checkpoint or export as a plain TokenFormer; evaluate loss/perplexity; generate text."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoint import load_weights, model_config_of
from .config import ModelConfig, from_dict
from .data.reader import read_texts
from .model import KVCache, TokenFormer
from .tokenizer import build_tokenizer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_dtype(device: str) -> str:
    """bf16 on a GPU (as it trained there), fp32 on a CPU (whose bf16 kernels are slower than its fp32 ones)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


# --- Hugging Face exports (hf/export.py writes them): config.json's field names on both sides, one table ------

# ModelConfig field -> TokenFormerConfig field (configuration_tokenformer.py)
HF_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
    "qkv_tokens": "qkv_tokens", "proj_tokens": "proj_tokens", "ffn_tokens": "ffn_tokens",
    "qkv_scale_tokens": "qkv_scale_tokens", "proj_scale_tokens": "proj_scale_tokens",
    "ffn_scale_tokens": "ffn_scale_tokens", "norm": "pattention_norm", "seq_length": "max_position_embeddings",
    "vocab_size": "vocab_size", "rotary_pct": "rotary_pct", "rotary_base": "rope_theta",
    "layernorm_eps": "layer_norm_eps", "init_std": "initializer_range", "arch": "arch",
    "ffn_hidden_size": "ffn_hidden_size",
}


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The TokenFormerConfig fields of a model (tau written out: scale tokens as numbers, never None)."""
    out = {hf: getattr(cfg, ours) for ours, hf in HF_FIELDS.items()}
    out.update({f"{k}_scale_tokens": cfg.scale_tokens(k) for k in ("qkv", "proj", "ffn")})
    out["ffn_hidden_size"] = cfg.ffn_width if cfg.arch == "transformer" else None  # the width itself, not None
    return out


def model_config_from_hf(d: dict) -> ModelConfig:
    """An exported config.json back to our ModelConfig (a scale equal to the token count is the unpinned None; a
    field an older export lacks, its default)."""
    cfg = ModelConfig(**{ours: d[hf] for ours, hf in HF_FIELDS.items() if hf in d})
    if cfg.arch != "transformer":
        cfg.ffn_hidden_size = None  # the HF config fills in a width for either
    for k in ("qkv", "proj", "ffn"):
        if cfg.arch == "transformer" or getattr(cfg, f"{k}_scale_tokens") == cfg.tokens(k):
            setattr(cfg, f"{k}_scale_tokens", None)
    return cfg


def load_model(path: str, device: str = "cpu", dtype: str = "fp32") -> tuple[TokenFormer, dict]:
    """A checkpoint directory (trainer's, resharded, layout-free), an export (model.safetensors + config.json) or a
    Hugging Face export (export-hf), in `dtype` (fp32, bf16, fp16; the KV cache follows it). Returns the model and the
    training config dict (for the tokenizer)."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        state, data = load_file(os.path.join(path, "model.safetensors")), {}
        if raw.get("model_type") == "tokenformer":  # export-hf: HF field names, parameters under "model."
            cfg = model_config_from_hf(raw)
            state = {k.removeprefix("model."): v.float() for k, v in state.items()}
            data = {"tokenizer_type": "HFTokenizer", "tokenizer_model": os.path.join(path, "tokenizer.json")}
        else:
            cfg = from_dict(ModelConfig, raw)
        model = TokenFormer(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(".scale_tokens")]  # tau is in the config, set at build
        if missing or unexpected:
            raise ValueError(f"{path}: model.safetensors does not match its config.json: missing {missing}, "
                             f"unexpected {unexpected}")
        full = {"model": cfg.__dict__, "data": data}
    else:
        model = TokenFormer(model_config_of(path))
        full = load_weights(model, path)["config"]
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), full


def tokenizer_for(config: dict, tokenizer_type: str | None = None, tokenizer_model: str | None = None):
    data = config.get("data", {})
    ttype, tmodel = tokenizer_type or data.get("tokenizer_type"), tokenizer_model or data.get("tokenizer_model")
    if not tmodel:
        raise ValueError("no tokenizer recorded with this checkpoint: pass --tokenizer-type/--tokenizer-model")
    return build_tokenizer(ttype, tmodel)


def documents(data: str, tokenizer, max_docs: int | None) -> Iterator[list[int]]:
    """Token ids per document (EOD appended) from an indexed-dataset prefix or a .jsonl(.zst) file."""
    if os.path.exists(data + ".idx"):
        # here: megatron-core's import takes 4 s (measured, 2 cores), which generate and evaluate on text need not
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        ds = IndexedDataset(data)
        for i in range(len(ds) if max_docs is None else min(max_docs, len(ds))):
            yield ds[i].tolist()
        return
    for i, row in enumerate(read_texts([data], ("text",))):
        if max_docs is not None and i >= max_docs:
            return
        yield tokenizer.encode(row[0]) + [tokenizer.eod]


@torch.no_grad()
def evaluate(model: TokenFormer, docs: Iterator[list[int]], batch_size: int = 8) -> dict:
    """Mean next-token loss over the documents concatenated and cut into seq_length windows."""
    T = model.cfg.seq_length
    device = next(model.parameters()).device
    stream, total, count = [], 0.0, 0

    def run(windows):
        nonlocal total, count
        x = torch.tensor(windows, device=device)
        logits = model(x[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += losses.item()
        count += x[:, 1:].numel()

    batch = []
    for doc in docs:
        stream.extend(doc)
        while len(stream) >= T + 1:
            batch.append(stream[: T + 1])
            stream = stream[T:]
            if len(batch) == batch_size:
                run(batch)
                batch = []
    if batch:
        run(batch)
    if count == 0:
        raise ValueError(f"not enough tokens for one window of {T + 1}")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


@torch.no_grad()
def generate(model: TokenFormer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[int]:
    """Sample one token at a time (streaming); the context is the last seq_length tokens.

    With the KV cache a new token costs one position's forward, until the context is full; from then on the window
    slides by a token a step and every position moves, so each step re-reads the window (as without the cache)."""
    device = next(model.parameters()).device
    window = model.cfg.seq_length
    ids, cache = list(prompt), None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(torch.tensor([ids[-window:]], device=device))[0, -1].float()
        else:
            if cache is None or cache.length >= window:  # (re)read the last window of tokens
                cache, new = KVCache(model.cfg), ids[-window:]
            else:  # a cache not yet full holds ids[:cache.length]
                new = ids[cache.length:]
            logits = model(torch.tensor([new], device=device), cache=cache)[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
                logits[order[drop]] = float("-inf")
            nxt = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        ids.append(nxt)
        yield nxt
