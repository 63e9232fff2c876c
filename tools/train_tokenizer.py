#!/usr/bin/env python
"""tokenformer-train-tokenizer from a checkout: tokenformer_mp/cli/train_tokenizer.py (--help for its options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from tokenformer_mp.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
