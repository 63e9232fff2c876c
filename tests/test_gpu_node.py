"""What the first GPU node needs, proven on a CPU: the supported versions, ranks that can start under CUDA, the
accelerator a CPU run asks for on a GPU host, and the GPU check's own machinery (deadlines, results kept, loud
failures, the offline wheelhouse install)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from deepspeed.accelerator import get_accelerator, set_accelerator
from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

from tests.conftest import REPO, debug_overrides
from tests.runs import train
from tokenformer_mp import versions
from tokenformer_mp.bench.gpu_check import PARTS, junit_results, run_command
from tokenformer_mp.config import ConfigError, load_config, validate
from tokenformer_mp.parallel.local import preload_modules, run_ranks


def test_supported_versions_are_checked_at_start(monkeypatch, tmp_path):
    """Below PyTorch 2.11 or Python 3.11: refused with one line (exit 2 through the config's check); newer than
    tested: a warning; the ends of the range pass."""
    assert versions.check("2.11.0+cu130", (3, 12)) == [] and versions.check("2.13.0+cpu", (3, 11)) == []
    with pytest.raises(versions.UnsupportedVersion, match=r"PyTorch 2\.10\.1\+cu128 is older than 2\.11"):
        versions.check("2.10.1+cu128", (3, 12))
    with pytest.raises(versions.UnsupportedVersion, match=r"Python 3\.10 is older than 3\.11"):
        versions.check("2.13.0", (3, 10))
    with pytest.warns(UserWarning, match="newer than 2.13"):
        assert versions.check("2.15.0", (3, 12)) == ["PyTorch 2.15.0 is newer than 2.13, the newest tested"]
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu126")
    cfg = load_config("configs/debug.yaml", {"run_dir": str(tmp_path), "train.device": "cpu"})
    with pytest.raises(ConfigError, match=r"^PyTorch 2\.10\.0\+cu126 is older than 2\.11, the oldest supported"):
        validate(cfg, check_paths=False, check_env=True)


def test_rank_preload_never_asks_cuda():
    """run_ranks forks its ranks from a server that preloaded the trainer's libraries. A process that has asked CUDA
    anything (is_available included) cannot give CUDA to a forked child, so with a CUDA-built torch the preload must
    not ask: imported here with every CUDA query made to fail. DeepSpeed's import does ask, which is why it is left
    out there (if this part fails, a newer DeepSpeed stopped asking and may be preloaded everywhere)."""
    code = ("import importlib, sys, torch\n"
            "asked = []\n"  # recorded, not raised: DeepSpeed catches what its detection raises
            "for name in ('is_available', 'device_count', 'init', '_lazy_init', 'current_device'):\n"
            "    setattr(torch.cuda, name, lambda *a, _n=name, **k: asked.append(_n) or 0)\n"
            "for m in sys.argv[1:]: importlib.import_module(m)\n"
            "print('ASKED', sorted(set(asked)))\n")

    def asked(modules: list[str]) -> str:
        res = subprocess.run([sys.executable, "-c", code, *modules], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout.split("ASKED ")[-1].strip()

    cuda_free = preload_modules(cuda_built=True)
    assert "deepspeed" not in cuda_free and preload_modules(cuda_built=False) == cuda_free + ["deepspeed"]
    assert asked(cuda_free) == "[]"
    assert asked(["deepspeed"]) != "[]"


def _train_where_deepspeed_chose_cuda(overrides: dict) -> tuple[str, str, list[dict]]:
    """What DeepSpeed's import decides by itself on a GPU host: the CUDA accelerator."""
    set_accelerator(CUDA_Accelerator())
    history = train(overrides)
    return get_accelerator()._name, os.environ["DS_ACCELERATOR"], history


def test_device_cpu_on_a_gpu_host_runs_wholly_on_the_cpu(sample, tmp_path):
    """train.device cpu where DeepSpeed picked CUDA: the trainer sets DeepSpeed's CPU accelerator before any process
    group, so the engine keeps the module on the CPU with its batches (without it: the module goes to cuda:0)."""
    name, env, hist = run_ranks(1, _train_where_deepspeed_chose_cuda,
                                debug_overrides(sample, tmp_path, **{"train.steps": 2}))[0]
    assert (name, env) == ("cpu", "cpu") and [h["step"] for h in hist] == [1, 2]


def test_a_part_past_its_deadline_is_killed_with_everything_it_started(tmp_path):
    """The check's parts run in process groups of their own: at the deadline the whole group goes (ranks and
    forkservers a test started included), and the output up to then is kept, streamed line by line."""
    lines = []
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print('child', child.pid, flush=True)\n"
            "time.sleep(120)\n")
    start = time.monotonic()
    run = run_command([sys.executable, "-c", code], 3.0, lines.append, grace_s=2.0)
    assert run["rc"] is None and run["group_gone"] and time.monotonic() - start < 20
    child = int(next(line for line in lines if line.startswith("child")).split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert any("past its 3 s deadline" in line for line in lines)


def _check(tmp_path, *args, env=None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    return res, json.loads((out / "results.json").read_text())


def test_the_check_fails_loudly_without_cuda_and_rehearses_on_a_cpu(tmp_path):
    """--device cuda where PyTorch sees no GPU: exit 1 and the reason, nothing after the environment; --device cpu:
    the environment part passes with its figures. results.json and log.txt are written either way."""
    res, results = _check(tmp_path / "cuda", "--parts", "a,b", env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 1, res.stdout[-3000:]
    assert "CUDA is not available to this PyTorch" in results["stop"] and results["ok"] is False
    assert [p["part"] for p in results["parts"]] == ["a"]
    assert "CUDA is not available" in (tmp_path / "cuda" / "out" / "log.txt").read_text()
    res, results = _check(tmp_path / "cpu", "--parts", "a", "--device", "cpu")
    assert res.returncode == 0, res.stdout[-3000:]
    env = results["environment"]
    assert results["ok"] and env["torch"] == torch.__version__ and env["gpus"] == 0 and env["matmul_tflops"] > 0
    assert env["deepspeed"] and env["megatron-core"]


def test_every_test_the_check_names_exists_and_skips_without_a_gpu(tmp_path):
    """tests/test_gpu.py collected and run here: every test a part of the check names is there (a renamed test would
    make its part fail for fewer tests), and without a GPU each skips saying why."""
    xml = tmp_path / "tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={xml}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    rows = junit_results(str(xml))
    named = {t for part in PARTS for _, t in part.tests}
    assert named <= {r["name"] for r in rows}, named - {r["name"] for r in rows}
    assert {r["status"] for r in rows} == {"skipped"} and all("needs a CUDA GPU" in r["detail"] for r in rows)


@pytest.mark.skipif(not (os.environ.get("TOKENFORMER_WHEELHOUSE") and os.environ.get("TOKENFORMER_REHEARSAL_PYTHON")),
                    reason="set TOKENFORMER_WHEELHOUSE (tools/make_wheelhouse.sh) and TOKENFORMER_REHEARSAL_PYTHON (a "
                           "Python with only torch and a GPU node's packages) to test the offline install")
def test_the_wheelhouse_installs_offline_and_runs_the_check(tmp_path):
    """tools/gpu_check.sh --python with a wheelhouse, pip's index off: DeepSpeed and megatron-core come from the
    wheelhouse into a scratch directory and the environment part runs with them."""
    out = tmp_path / "out"
    res = subprocess.run(["bash", "tools/gpu_check.sh", "--python", os.environ["TOKENFORMER_REHEARSAL_PYTHON"],
                          "--wheelhouse", os.environ["TOKENFORMER_WHEELHOUSE"], "--out", str(out), "--device", "cpu",
                          "--parts", "a"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    env = json.loads((out / "results.json").read_text())["environment"]
    assert env["deepspeed"] and env["megatron-core"]
