"""Official TokenFormer weights in and out, and exports for inference and for Hugging Face transformers.

  tokenformer-convert import-neox --state-dict pytorch_model.bin --neox-config eval.yml --save ckpt/
  tokenformer-convert export-neox --load runs/debug/checkpoints --save neox/
  tokenformer-convert export --load runs/debug/checkpoints --save export/
  tokenformer-convert export-hf --load runs/debug/checkpoints --save hf/ [--dtype bf16]
"""
import argparse
import json
import sys

import torch
import yaml

from ..convert import export_neox, export_safetensors, import_neox, model_config_from_neox, tokenizer_from_neox


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-neox", help="GPT-NeoX pipeline state dict (sequential.N.*) -> layout-free checkpoint")
    imp.add_argument("--state-dict", required=True, help="pytorch_model.bin (fp32)")
    imp.add_argument("--neox-config", required=True, help="YAML/JSON with num_layers, hidden_size, qkv_slot_num, ...")
    imp.add_argument("--save", required=True)
    for name, help in [("export-neox", "checkpoint -> pytorch_model.bin (sequential.N.*) + config.yml, the paper's "
                                       "code's own layout (not for grown checkpoints)"),
                       ("export", "checkpoint -> model.safetensors + config.json"),
                       ("export-hf", "checkpoint -> a directory transformers loads (trust_remote_code=True)")]:
        exp = sub.add_parser(name, help=help)
        exp.add_argument("--load", required=True, help="checkpoint directory or export")
        exp.add_argument("--save", required=True)
        if name == "export-hf":
            exp.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
            exp.add_argument("--tokenizer-type", help="default: the one the checkpoint was trained with")
            exp.add_argument("--tokenizer-model")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "import-neox":
            with open(args.neox_config) as f:
                neox = yaml.safe_load(f)
            sd = torch.load(args.state_dict, map_location="cpu", weights_only=True)
            import_neox(sd, model_config_from_neox(neox, sd), args.save, tokenizer_from_neox(neox))
        elif args.cmd == "export-neox":
            export_neox(args.load, args.save)
        elif args.cmd == "export":
            export_safetensors(args.load, args.save)
        else:
            from ..hf.export import export_hf  # here: transformers takes 3 s to import (measured), for this export only
            export_hf(args.load, args.save, args.dtype, args.tokenizer_type, args.tokenizer_model)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: CheckpointError, torch.load's
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"saved": args.save}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
