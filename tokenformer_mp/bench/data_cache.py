"""The dataset index build at the Pile's scale: megatron-core's document, sample and shuffle indices for 10^8
samples of 2,048 tokens over a synthetic indexed dataset (its .idx written whole, its .bin a sparse file: the build
reads only sequence lengths), timed with its peak memory, in a process of its own as tools/build_data_cache.py runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from megatron.core.datasets.indexed_dataset import _IndexWriter

_BUILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from tokenformer_mp.config import load_config
from tokenformer_mp.data.datasets import build_cache
from tokenformer_mp.tokenizer import build_tokenizer
cfg = load_config("configs/debug.yaml", json.loads(sys.argv[1]))
start = time.perf_counter()
build_cache(cfg, 1, build_tokenizer("HFTokenizer", "tokenizers/gpt-neox-20b/tokenizer.json"))
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def synthetic_prefix(path: str, documents: int, doc_tokens: int) -> str:
    """An indexed dataset of `documents` documents of `doc_tokens` uint16 tokens: a real .idx, a sparse .bin."""
    lengths = np.full(documents, doc_tokens, dtype=np.int32)
    with _IndexWriter(path + ".idx", np.uint16) as writer:
        writer.write(lengths, None, np.arange(documents + 1, dtype=np.int64))
    with open(path + ".bin", "wb") as f:
        f.truncate(documents * doc_tokens * 2)
    return path


def measure(samples: int = 10**8, seq_length: int = 2048, doc_tokens: int = 20480) -> dict:
    documents = -(-samples * (seq_length + 1) // doc_tokens)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        prefix = synthetic_prefix(os.path.join(d, "synthetic"), documents, doc_tokens)
        overrides = {"data.prefixes": [prefix], "data.split": "100,0,0", "model.seq_length": seq_length,
                     "train.steps": samples, "train.micro_batch_size": 1, "train.grad_accum_steps": 1,
                     "train.eval_interval": 0, "train.eval_iters": 0, "run_dir": d}
        res = subprocess.run([sys.executable, "-c", _BUILD.format(repo=repo), json.dumps(overrides)], cwd=repo,
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"the index build failed:\n{res.stderr[-3000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        cache_mb = sum(os.path.getsize(os.path.join(d, "data_cache", f)) for f in os.listdir(os.path.join(d, "data_cache")))
    return {"samples": samples, "seq_length": seq_length, "documents": documents,
            "tokens": documents * doc_tokens, "cache_gb": cache_mb / 1e9, **out}
