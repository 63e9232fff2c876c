"""Print a checkpoint's manifest: config, layout, step, and every tensor's shape, dtype and checksum."""
import argparse
import json
import sys

from ..checkpoint import CheckpointError, read_manifest, resolve_source, verify


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path")
    ap.add_argument("--verify", action="store_true",
                    help="read every block of every tensor and check its checksum")
    ap.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    args = ap.parse_args(argv)
    try:
        path = resolve_source(args.path, strict=args.verify)  # a fallback would verify another checkpoint
        m = read_manifest(path)
        checked = verify(path, m) if args.verify else 0
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    model = m["model"]
    print(f"{path}\nformat {m['format']}  step {m['step']}  tokens_seen {m['tokens_seen']}  "
          f"source layout {m['source_layout']}  optimizer {'yes' if m.get('optimizer') else 'no'}")
    print("model " + " ".join(f"{k}={v}" for k, v in model.items()))
    if m.get("grown_from"):
        print("grown from " + " ".join(f"{k}_tokens={v}" for k, v in m["grown_from"].items()) +
              "  (the old tokens: train.old_tokens_lr_mult)")
    if m.get("growth"):  # the recipe it was grown with; the trainer runs its stage's schedule
        print("growth recipe " + " ".join(f"{k}={v}" for k, v in m["growth"].items()))
    for name, e in m["tensors"].items():
        segments = sum(len(v) for v in e["segments"].values())
        print(f"  {name:<45} {str(e['shape']):<14} {e['dtype']:<8} {','.join(e['keys']):<28} {segments} segments")
    print(f"{len(m['files'])} files, {sum(f['size'] for f in m['files'].values()) / 1e6:.1f} MB")
    if args.verify:
        print(f"checksums: all ok ({checked / 1e6:.1f} MB read and checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
