"""python -m tokenformer_mp.info --config FILE [overrides]: parameter counts and FLOPs per token as JSON."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config, pad_vocab, parse_overrides, validate
from .model import count_params, flops_per_token


def model_info(cfg) -> dict:
    m = cfg.model
    if m.vocab_size is None:
        raise ConfigError("model.vocab_size: needed to count parameters (set it, e.g. 50304 for the GPT-NeoX tokenizer)")
    shape = ({"ffn_hidden_size": m.ffn_width} if m.arch == "transformer" else
             {"tokens": {k: m.tokens(k) for k in ("qkv", "proj", "ffn")}})
    return {**count_params(m), "flops_per_token": flops_per_token(m),
            "flops_per_token_causal": flops_per_token(m, causal=True), "arch": m.arch, "num_layers": m.num_layers,
            "hidden_size": m.hidden_size, **shape, "seq_length": m.seq_length, "vocab_size": m.vocab_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
        if cfg.model.vocab_size is not None:
            cfg.model.vocab_size = pad_vocab(cfg.model.vocab_size, cfg.model.pad_vocab_multiple)
        validate(cfg, check_paths=False)
        print(json.dumps(model_info(cfg)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
