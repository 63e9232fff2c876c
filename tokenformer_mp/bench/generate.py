"""Generation speed with the KV cache against re-reading the context every token, on random weights."""
from __future__ import annotations

import time

import torch

from ..config import ModelConfig
from ..inference import generate
from ..model import TokenFormer


def measure(cfg: ModelConfig, prompt_tokens: int, new_tokens: int, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict:
    """Greedy tokens/s both ways, and whether they chose the same tokens."""
    torch.manual_seed(0)
    model = TokenFormer(cfg).to(device, dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,)).tolist()
    row = {"model": f"{cfg.num_layers}x{cfg.hidden_size}, context {cfg.seq_length}", "device": device,
           "prompt": prompt_tokens, "new_tokens": new_tokens}
    out = {}
    for use_cache in (True, False):
        list(generate(model, prompt, 2, temperature=0.0, use_cache=use_cache))  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out[use_cache] = list(generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache))
        row["cached_tok_s" if use_cache else "uncached_tok_s"] = new_tokens / (time.perf_counter() - start)
    row["speedup"] = row["cached_tok_s"] / row["uncached_tok_s"]
    row["same_tokens"] = out[True] == out[False]
    return row
