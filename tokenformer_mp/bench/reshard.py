"""Resharding + expansion time and peak memory against checkpoint size (peak RSS should not grow with the model)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import torch

from ..checkpoint import OfflineWriter
from ..config import load_config
from ..model import TokenFormer


def make_random_checkpoint(config: str, out: str, seed: int = 0) -> dict:
    """A weights-only layout-free checkpoint of the config's shapes, written one tensor at a time."""
    cfg = load_config(config)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in TokenFormer(cfg.model).named_parameters()}
    g = torch.Generator().manual_seed(seed)
    writer, largest = OfflineWriter(out), 0
    for name, shape in shapes.items():
        writer.add(name, {"weight": torch.randn(shape, generator=g).mul_(0.02)})
        largest = max(largest, 4 * int(torch.Size(shape).numel()))
    manifest = writer.commit(config=cfg.to_dict(), model=cfg.to_dict()["model"], step=0, tokens_seen=0,
                             optimizer=None, source_layout={"tp": 1, "pp": 1, "dp": 1})
    total = sum(f["size"] for f in manifest["files"].values())
    return {"bytes": total, "largest_tensor_bytes": largest, "tensors": len(shapes)}


def measure(config: str, workdir: str, tp: int = 2, pp: int = 2, expand_factor: float = 2.0) -> dict:
    src, dst = os.path.join(workdir, "src"), os.path.join(workdir, "dst")
    shutil.rmtree(workdir, ignore_errors=True)
    info = make_random_checkpoint(config, src)
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "reshard_checkpoint.py")
    # The tool's own peak RSS, reported by the process itself as it exits (RUSAGE_CHILDREN would mix in others).
    wrapper = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
               "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "finally:\n    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", wrapper, tool, "--load", src, "--save", dst, "--tp", str(tp),
                          "--pp", str(pp), "--expand-factor", str(expand_factor)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if "PEAK_RSS_KB" not in res.stderr:
        raise RuntimeError(res.stderr[-2000:])
    peak = int(res.stderr.split("PEAK_RSS_KB")[1].split()[0]) * 1024
    out_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(dst) for f in fs)
    largest_out = max(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(dst) for f in fs)
    limit = 2 * max(info["largest_tensor_bytes"], largest_out) + 2**30
    shutil.rmtree(workdir, ignore_errors=True)
    return {"config": os.path.basename(config), "checkpoint_gb": info["bytes"] / 1e9, "output_gb": out_bytes / 1e9,
            "largest_tensor_mb": info["largest_tensor_bytes"] / 1e6, "seconds": seconds, "peak_rss_gb": peak / 1e9,
            "limit_gb": limit / 1e9, "within_limit": peak <= limit}
