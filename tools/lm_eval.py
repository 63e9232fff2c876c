#!/usr/bin/env python
"""tokenformer-lm-eval from a checkout: tokenformer_mp/cli/lm_eval.py (--help for its options)."""
import os
import sys

# sys.path[0] is tools/, where this file would shadow the lm_eval package: the checkout instead.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]
from tokenformer_mp.cli.lm_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
