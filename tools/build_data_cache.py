#!/usr/bin/env python
"""tokenformer-build-data-cache from a checkout: tokenformer_mp/cli/build_data_cache.py (--help for its options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from tokenformer_mp.cli.build_data_cache import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
