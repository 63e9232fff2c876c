"""Make the bundled sample data/sample/{train,val}.jsonl.zst from minipile's public-domain / CC0 domains.

Deterministic: documents are taken in file order until each domain's character budget is reached; every
VAL_EVERY-th document of each domain goes to val, the others to train.

    python tools/make_sample.py --input '../shared/data/minipile/train-*.jsonl.zst' --output-dir data/sample
"""

import argparse
import json
import os
import sys
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package

from tokenformer_mp.data.reader import expand_inputs, iter_lines  # noqa: E402

# pile_set_name -> characters to take. Only domains whose licence allows redistribution without attribution terms.
BUDGETS = {"Speeches": 3_500_000, "Books (Gutenberg)": 3_500_000, "Emails": 4_000_000}
VAL_EVERY = 20
ZSTD_LEVEL = 19


def select(inputs: list[str], budgets: dict[str, int]) -> dict[str, list[bytes]]:
    """Raw JSON lines of the chosen documents, split into train and val."""
    taken, count = dict.fromkeys(budgets, 0), dict.fromkeys(budgets, 0)
    out = {"train": [], "val": []}
    for path in expand_inputs(inputs):
        for line in iter_lines(path):
            doc = json.loads(line)
            domain = doc["meta"]["pile_set_name"]
            if domain not in budgets or taken[domain] >= budgets[domain]:
                continue
            taken[domain] += len(doc["text"])
            count[domain] += 1
            out["val" if count[domain] % VAL_EVERY == 0 else "train"].append(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=["../shared/data/minipile/train-*.jsonl.zst"])
    p.add_argument("--output-dir", default="data/sample")
    a = p.parse_args()
    os.makedirs(a.output_dir, exist_ok=True)
    for split, lines in select(a.input, BUDGETS).items():
        path = os.path.join(a.output_dir, f"{split}.jsonl.zst")
        data = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(b"\n".join(lines) + b"\n")
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(lines)} docs, {len(data) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
