"""Initialisation per rank by tensor-parallel degree: the model built on the meta device, a rank's parameters
allocated and drawn (model.init_rows_: its own rows only), timed with its peak host memory, each degree in a
process of its own. Falls as 1/TP where every rank used to draw every full tensor."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_INIT = """
import json, resource, sys, time
import torch
sys.path.insert(0, {repo!r})
from tokenformer_mp.config import load_config
from tokenformer_mp.model import TokenFormer, init_weights
from tokenformer_mp.parallel.build import _allocate
from tokenformer_mp.parallel.tensor_parallel import shard_rows
cfg = load_config({config!r}).model
tp = int(sys.argv[1])
torch.set_num_threads(1)
with torch.device("meta"):
    model = TokenFormer(cfg)
shard_rows(model, tp, 0)
start = time.perf_counter()
_allocate(model)
init_weights(model, 1234)
print(json.dumps({{"tp": tp, "seconds": time.perf_counter() - start,
                  "params_gb": sum(p.numel() for p in model.parameters()) * 4 / 1e9,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def measure(config: str = "configs/tokenformer-1.5b.yaml", tps=(1, 2, 4, 8)) -> list[dict]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = []
    for tp in tps:
        res = subprocess.run([sys.executable, "-c", _INIT.format(repo=repo, config=config), str(tp)], cwd=repo,
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"initialisation at TP={tp} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["vs_tp1"] = r["seconds"] / rows[0]["seconds"]
    return rows
