"""Hugging Face interop: the config field names on both sides, as one table (importing this needs no transformers)."""
from __future__ import annotations

from ..config import ModelConfig

# ModelConfig field -> TokenFormerConfig field (configuration_tokenformer.py)
HF_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
    "qkv_tokens": "qkv_tokens", "proj_tokens": "proj_tokens", "ffn_tokens": "ffn_tokens",
    "qkv_scale_tokens": "qkv_scale_tokens", "proj_scale_tokens": "proj_scale_tokens",
    "ffn_scale_tokens": "ffn_scale_tokens", "norm": "pattention_norm", "seq_length": "max_position_embeddings",
    "vocab_size": "vocab_size", "rotary_pct": "rotary_pct", "rotary_base": "rope_theta",
    "layernorm_eps": "layer_norm_eps", "init_std": "initializer_range",
}


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The TokenFormerConfig fields of a model (tau written out: scale tokens as numbers, never None)."""
    out = {hf: getattr(cfg, ours) for ours, hf in HF_FIELDS.items()}
    out.update({f"{k}_scale_tokens": cfg.scale_tokens(k) for k in ("qkv", "proj", "ffn")})
    return out


def model_config_from_hf(d: dict) -> ModelConfig:
    """An exported config.json back to our ModelConfig (a scale equal to the token count is the unpinned None)."""
    cfg = ModelConfig(**{ours: d[hf] for ours, hf in HF_FIELDS.items()})
    for k in ("qkv", "proj", "ffn"):
        if getattr(cfg, f"{k}_scale_tokens") == cfg.tokens(k):
            setattr(cfg, f"{k}_scale_tokens", None)
    return cfg
