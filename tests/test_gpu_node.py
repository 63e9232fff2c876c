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
from tokenformer_mp.bench.gpu_check import PARTS, Check, junit_results, run_command
from tokenformer_mp.config import ConfigError, load_config, validate
from tokenformer_mp.parallel.local import run_ranks, start_method


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


def _rank_facts() -> dict:
    return {"cuda_bad_fork": torch.cuda._is_in_bad_fork(), "pid": os.getpid()}


def test_ranks_never_fork_from_a_process_that_asked_cuda():
    """A process that has asked CUDA anything (is_available included) cannot give CUDA to a child forked from it, and
    under a CUDA-built torch the trainer's imports ask (megatron-core through torch.utils.cpp_extension, inductor,
    DeepSpeed's detection; measured under torch 2.11+cu130). So ranks fork from a preloaded server only where no GPU
    is visible, and are spawned where one is. Both ways start here: spawned ranks can use CUDA; forked ones are in a
    bad fork (could not) exactly where torch is built with CUDA, harmless without a GPU."""
    assert start_method(gpu=True) == ("spawn", [])
    method, preload = start_method(gpu=False)
    assert method == "forkserver" and "megatron.core.parallel_state" in preload
    spawned, forked = (run_ranks(2, _rank_facts, gpu=gpu) for gpu in (True, False))
    assert [r["cuda_bad_fork"] for r in spawned] == [False, False] and spawned[0]["pid"] != spawned[1]["pid"]
    assert [r["cuda_bad_fork"] for r in forked] == [torch.backends.cuda.is_built()] * 2


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
    assert [(p["part"], p["status"]) for p in results["parts"]] == [("a", "passed")]  # it looked, and saw none
    assert results["environment"]["gpus"] == 0 and results["environment"]["torch"] == torch.__version__
    assert "CUDA is not available" in (tmp_path / "cuda" / "out" / "log.txt").read_text()
    res, results = _check(tmp_path / "cpu", "--parts", "a", "--device", "cpu")
    assert res.returncode == 0, res.stdout[-3000:]
    env = results["environment"]
    assert results["ok"] and env["torch"] == torch.__version__ and env["gpus"] == 0 and env["matmul_tflops"] > 0
    assert env["deepspeed"] and env["megatron-core"]


def test_which_parts_run_on_which_machine(tmp_path):
    """The check's course where it cannot run here: on one GPU every part but h, with its tests; on two, h too (TP2,
    PP2, DP2, CP2, two srun tasks, the Transformer at TP2 and PP2); before part a has looked, only part a; a CPU
    rehearses a, b, d and g."""
    def runs(device: str, gpus: int) -> dict:
        check = Check(str(tmp_path / f"{device}{gpus}"), 400, device)
        check.gpus = gpus
        return {p.key: len(check.command(p, 100)[1]) for p in PARTS if check.why_skipped(p) is None}
    assert runs("cuda", 0) == {"a": 0}
    assert runs("cuda", 1) == {"a": 0, "b": 2, "c": 7, "d": 6, "e": 0, "f": 0, "g": 1}
    assert runs("cuda", 2) == {**runs("cuda", 1), "h": 7}
    assert runs("cpu", 0) == {"a": 0, "b": 2, "d": 6, "g": 1}


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
