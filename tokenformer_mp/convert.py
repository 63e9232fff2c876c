"""In and out: official TokenFormer weights (GPT-NeoX pipeline state dict) -> a layout-free checkpoint, and any
checkpoint -> one safetensors file plus a JSON config for inference."""
from __future__ import annotations

import json
import os
import re

import torch

from .checkpoint import load_weights, model_config_of, write_atomic, write_layout_free
from .config import Config, ModelConfig

# GPT-NeoX pipeline names (sequential.0 = embedding, 2..L+1 = layers, L+3 = final norm) -> ours, as one table.
NEOX_LAYER = {
    "attention.query.key_param_tokens": "attention.query.key_tokens",
    "attention.query.value_param_tokens": "attention.query.value_tokens",
    "attention.key.key_param_tokens": "attention.key.key_tokens",
    "attention.key.value_param_tokens": "attention.key.value_tokens",
    "attention.value.key_param_tokens": "attention.value.key_tokens",
    "attention.value.value_param_tokens": "attention.value.value_tokens",
    "attention.proj.key_param_tokens": "attention.proj.key_tokens",
    "attention.proj.value_param_tokens": "attention.proj.value_tokens",
    "mlp.key_param_tokens": "ffn.key_tokens",
    "mlp.value_param_tokens": "ffn.value_tokens",
}
NEOX_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.norm_factor|_extra_state)$")


def neox_to_ours(name: str, num_layers: int) -> str | None:
    """'sequential.2.mlp.key_param_tokens' -> 'layers.0.ffn.key_tokens'; None for buffers we recompute."""
    if NEOX_IGNORED.match(name):
        return None
    m = re.match(r"sequential\.(\d+)\.(.+)$", name)
    if m is None:
        raise KeyError(f"{name}: not a GPT-NeoX pipeline name (sequential.N.*)")
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0 and rest == "word_embeddings.weight":
        return "embed.weight"
    if 2 <= idx <= num_layers + 1 and rest in NEOX_LAYER:
        return f"layers.{idx - 2}.{NEOX_LAYER[rest]}"
    if idx == num_layers + 3 and rest in ("norm.weight", "norm.bias"):
        return "final_norm." + rest.split(".")[1]
    raise KeyError(f"{name}: no TokenFormer parameter corresponds to it")


def model_config_from_neox(cfg: dict) -> ModelConfig:
    """The reference's eval-config fields (num_layers, hidden_size, qkv_slot_num, ...) -> our ModelConfig."""
    norm = cfg.get("norm_activation_type", "l2_norm_gelu")
    return ModelConfig(num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], num_heads=cfg["num_attention_heads"],
                       qkv_tokens=cfg["qkv_slot_num"], proj_tokens=cfg["proj_slot_num"], ffn_tokens=cfg["ffn_slot_num"],
                       norm=norm, seq_length=cfg.get("seq_length", cfg.get("max_position_embeddings", 2048)),
                       vocab_size=cfg.get("padded_vocab_size", 50304), rotary_pct=cfg.get("rotary_pct", 0.25))


def import_neox(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out: str) -> None:
    """Write the official weights as a layout-free checkpoint (weights only), ready to train, grow or reshard."""
    tensors, unknown = {}, []
    for name, t in state_dict.items():
        try:
            ours = neox_to_ours(name, model_cfg.num_layers)
        except KeyError as e:
            unknown.append(str(e))
            continue
        if ours is not None:
            tensors[ours] = t
    from .model import TokenFormer
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in TokenFormer(model_cfg).named_parameters()}
    problems = unknown + [f"{n}: missing" for n in expected if n not in tensors]
    problems += [f"{n}: {list(tensors[n].shape)} vs expected {list(s)}" for n, s in expected.items()
                 if n in tensors and tuple(tensors[n].shape) != s]
    if problems:
        raise ValueError("cannot import:\n  " + "\n  ".join(problems))
    cfg = Config(model=model_cfg)
    write_layout_free(tensors, cfg, out, {"imported_from": "gpt-neox pipeline state dict"})


def export_safetensors(ckpt: str, out_dir: str) -> str:
    """One model.safetensors (canonical names) + config.json, for inference and evaluation."""
    from safetensors.torch import save_file

    from .model import TokenFormer
    cfg = model_config_of(ckpt)
    model = TokenFormer(cfg)
    load_weights(model, ckpt)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"format": "tokenformer_mp"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    from dataclasses import asdict
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(asdict(cfg), indent=1))
    return out_dir
