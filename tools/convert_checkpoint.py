#!/usr/bin/env python
"""Import official TokenFormer weights, or export a checkpoint for inference.

  python tools/convert_checkpoint.py import-neox --state-dict pytorch_model.bin --neox-config eval.yml --save ckpt/
  python tools/convert_checkpoint.py export --load runs/debug/checkpoints --save export/
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from tokenformer_mp.convert import export_safetensors, import_neox, model_config_from_neox  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-neox", help="GPT-NeoX pipeline state dict (sequential.N.*) -> layout-free checkpoint")
    imp.add_argument("--state-dict", required=True, help="pytorch_model.bin (fp32)")
    imp.add_argument("--neox-config", required=True, help="YAML/JSON with num_layers, hidden_size, qkv_slot_num, ...")
    imp.add_argument("--save", required=True)
    exp = sub.add_parser("export", help="checkpoint -> model.safetensors + config.json")
    exp.add_argument("--load", required=True)
    exp.add_argument("--save", required=True)
    args = ap.parse_args(argv)
    import torch
    import yaml
    try:
        if args.cmd == "import-neox":
            with open(args.neox_config) as f:
                neox = yaml.safe_load(f)
            sd = torch.load(args.state_dict, map_location="cpu", weights_only=True)
            import_neox(sd, model_config_from_neox(neox), args.save)
        else:
            export_safetensors(args.load, args.save)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: CheckpointError, torch.load's
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"saved": args.save}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
