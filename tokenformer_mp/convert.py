"""In and out: official TokenFormer weights (GPT-NeoX pipeline state dict) <-> a layout-free checkpoint, and any
checkpoint -> one safetensors file plus a JSON config for inference."""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict

import torch
import yaml
from safetensors.torch import save_file

from .checkpoint import load_weights, model_config_of, write_layout_free
from .config import Config, ConfigError, DataConfig, ModelConfig, validate
from .fileio import atomic_dir, write_atomic
from .inference import load_model
from .model import TokenFormer

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
NEOX_LAYER_INVERSE = {ours: theirs for theirs, ours in NEOX_LAYER.items()}
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


# GPT-NeoX config fields that change the function and that our model has no setting for: (GPT-NeoX's default when
# the field is absent, the one value we can import). Any other value is refused by name, never imported silently.
NEOX_FIXED = {"pos_emb": ("learned", "rotary"), "norm": ("layernorm", "layernorm_nonparam"),
              "final_norm": ("layernorm", "layernorm"), "gpt_j_residual": (False, False),
              "no_weight_tying": (False, False), "use_qk_layernorm": (False, False)}


def model_config_from_neox(cfg: dict, state_dict: dict[str, torch.Tensor] | None = None) -> ModelConfig:
    """The reference's config fields (num_layers, hidden_size, qkv_slot_num, ...) -> our ModelConfig, with GPT-NeoX's
    own defaults for absent fields (rotary_pct 1.0, rotary_emb_base 10000, layernorm_epsilon 1e-5). The vocabulary
    is padded_vocab_size, else the embedding's rows in state_dict."""
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}  # GPT-NeoX reads "rotary-pct" as rotary_pct
    bad = [f"{k}: {cfg.get(k, default)!r}{'' if k in cfg else ' (the default when absent)'}, only {want!r} imports"
           for k, (default, want) in NEOX_FIXED.items() if cfg.get(k, default) != want]
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "qkv_slot_num", "proj_slot_num",
                           "ffn_slot_num") if k not in cfg]
    bad += [f"{k}: missing" for k in missing]
    vocab = cfg.get("padded_vocab_size")
    if vocab is None:
        embedding = (state_dict or {}).get("sequential.0.word_embeddings.weight")
        if embedding is None:
            bad.append("padded_vocab_size: missing, and no sequential.0.word_embeddings.weight to count rows of")
        else:
            vocab = embedding.shape[0]
    if bad:
        raise ValueError("GPT-NeoX config cannot be imported:\n  " + "\n  ".join(bad))
    model = ModelConfig(num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"],
                        num_heads=cfg["num_attention_heads"], qkv_tokens=cfg["qkv_slot_num"],
                        proj_tokens=cfg["proj_slot_num"], ffn_tokens=cfg["ffn_slot_num"],
                        norm=cfg.get("norm_activation_type", "l2_norm_gelu"),
                        seq_length=cfg.get("seq_length") or cfg.get("max_position_embeddings") or 2048,
                        vocab_size=vocab, rotary_pct=float(cfg.get("rotary_pct", 1.0)),
                        rotary_base=float(cfg.get("rotary_emb_base", 10000)),
                        layernorm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
                        pad_vocab_multiple=cfg.get("make_vocab_size_divisible_by", 128))
    try:
        validate(Config(model=model), check_paths=False)
    except ConfigError as e:
        raise ValueError(f"GPT-NeoX config cannot be imported: {e}") from None
    return model


NEOX_TOKENIZERS = {"HFTokenizer": "HFTokenizer", "SPMTokenizer": "SentencePieceTokenizer"}  # theirs -> ours


def tokenizer_from_neox(cfg: dict) -> dict:
    """The tokenizer a GPT-NeoX config names (tokenizer_type, vocab_file) as our data fields; {} when it names none."""
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
    if not cfg.get("vocab_file"):
        return {}
    kind = cfg.get("tokenizer_type", "HFTokenizer")
    if kind not in NEOX_TOKENIZERS:
        raise ValueError(f"GPT-NeoX config: tokenizer_type {kind!r}: {', '.join(NEOX_TOKENIZERS)} can be recorded")
    return {"tokenizer_type": NEOX_TOKENIZERS[kind], "tokenizer_model": cfg["vocab_file"]}


def neox_config(cfg: ModelConfig, data: dict | None = None) -> dict:
    """Our ModelConfig as the reference's config fields (the inverse of model_config_from_neox)."""
    out = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads,
           "qkv_slot_num": cfg.qkv_tokens, "proj_slot_num": cfg.proj_tokens, "ffn_slot_num": cfg.ffn_tokens,
           "seq_length": cfg.seq_length, "max_position_embeddings": cfg.seq_length,
           "norm_activation_type": cfg.norm, "rotary_pct": cfg.rotary_pct, "rotary_emb_base": cfg.rotary_base,
           "layernorm_epsilon": cfg.layernorm_eps, "padded_vocab_size": cfg.vocab_size,
           "make_vocab_size_divisible_by": cfg.pad_vocab_multiple, "use_bias_in_attn_linear": False,
           "attention_config": [[["tokenformer"], cfg.num_layers]]}
    out.update({k: want for k, (_, want) in NEOX_FIXED.items()})
    if data and data.get("tokenizer_model"):
        theirs = {ours: name for name, ours in NEOX_TOKENIZERS.items()}[data["tokenizer_type"]]
        out.update({"tokenizer_type": theirs, "vocab_file": data["tokenizer_model"]})
    return out


def import_neox(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out: str,
                tokenizer: dict | None = None) -> None:
    """Write the official weights as a layout-free checkpoint (weights only), ready to train, grow or reshard.
    tokenizer: data fields to record with it (tokenizer_from_neox), so generation and evaluation find it."""
    tensors, unknown = {}, []
    for name, t in state_dict.items():
        try:
            ours = neox_to_ours(name, model_cfg.num_layers)
        except KeyError as e:
            unknown.append(str(e))
            continue
        if ours is not None:
            tensors[ours] = t
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in TokenFormer(model_cfg).named_parameters()}
    problems = unknown + [f"{n}: missing" for n in expected if n not in tensors]
    problems += [f"{n}: {list(tensors[n].shape)} vs expected {list(s)}" for n, s in expected.items()
                 if n in tensors and tuple(tensors[n].shape) != s]
    if problems:
        raise ValueError("cannot import:\n  " + "\n  ".join(problems))
    cfg = Config(model=model_cfg, data=DataConfig(**(tokenizer or {})))
    write_layout_free(tensors, cfg, out, {"imported_from": "gpt-neox pipeline state dict"})


def export_safetensors(ckpt: str, out_dir: str) -> str:
    """One model.safetensors (canonical names) + config.json, for inference and evaluation."""
    cfg = model_config_of(ckpt)
    model = TokenFormer(cfg)
    load_weights(model, ckpt)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"format": "tokenformer_mp"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(asdict(cfg), indent=1))
    return out_dir


def ours_to_neox(name: str, num_layers: int) -> str:
    """'layers.0.ffn.key_tokens' -> 'sequential.2.mlp.key_param_tokens' (the inverse of neox_to_ours)."""
    if name == "embed.weight":
        return "sequential.0.word_embeddings.weight"
    if name.startswith("final_norm."):
        return f"sequential.{num_layers + 3}.norm.{name.split('.')[1]}"
    _, i, rest = name.split(".", 2)
    return f"sequential.{int(i) + 2}.{NEOX_LAYER_INVERSE[rest]}"


def export_neox(ckpt: str, out_dir: str) -> str:
    """Any checkpoint -> the reference's layout: pytorch_model.bin (GPT-NeoX pipeline names, fp32) and config.yml,
    so the paper's own code and evaluation pipeline run it. A grown checkpoint has no such form: the reference's
    Pattention takes tau = sqrt(current token count), ours pins it to the count before growth."""
    model, config = load_model(ckpt)
    cfg = model.cfg
    if cfg.arch != "tokenformer":
        raise ValueError(f"{ckpt}: model.arch {cfg.arch}: the official layout holds TokenFormers only (Pattention "
                         f"slots); export it with export or export-hf instead.")
    pinned = [f"{k}_scale_tokens={cfg.scale_tokens(k)} with {k}_tokens={cfg.tokens(k)}"
              for k in ("qkv", "proj", "ffn") if cfg.scale_tokens(k) != cfg.tokens(k)]
    if pinned:
        raise ValueError(f"{ckpt}: a grown checkpoint ({', '.join(pinned)}) cannot be exported to the official "
                         f"layout: its Pattention takes tau = sqrt(current token count), so the same weights would "
                         f"compute another function. Export it with export or export-hf instead.")
    state = {ours_to_neox(n, cfg.num_layers): p.detach().clone() for n, p in model.named_parameters()}
    with atomic_dir(out_dir) as tmp:
        torch.save(state, os.path.join(tmp, "pytorch_model.bin"))
        with open(os.path.join(tmp, "config.yml"), "w") as f:
            yaml.safe_dump(neox_config(cfg, config.get("data")), f, sort_keys=False)
    return out_dir
