"""The GPU path (CUDA, bf16, SDPA's flash kernel, NCCL) against the CPU one. Skipped where no CUDA GPU is present;
the layouts that need several GPUs are skipped, saying how many, where fewer are visible. tools/gpu_check.sh runs
this module with the GPU benchmarks and writes one JSON of the results."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, debug_overrides
from tests.runs import train
from tests.test_long_context import DOCUMENTS
from tests.test_training import _args
from tokenformer_mp.model import Pattention
from tokenformer_mp.parallel.context_parallel import attend_chunks, chunk_index
from tokenformer_mp.parallel.local import _free_port, run_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def _gpus(n: int):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} GPUs, {GPUS} visible")


@pytest.mark.parametrize("recompute", [False, True])  # True: the GELU recomputed in backward
@pytest.mark.parametrize("fused", [False, True])  # True: the compiled kernels (Triton here)
def test_pattention_bf16_on_gpu_tracks_fp32_on_cpu(fused, recompute):
    torch.manual_seed(0)
    ref = Pattention(256, 384, 1024)
    x = torch.randn(4, 128, 256, requires_grad=True)
    ref(x).square().mean().backward()
    gpu = copy.deepcopy(ref).cuda().bfloat16()
    gpu.fused, gpu.recompute = fused, recompute
    gpu.zero_grad(set_to_none=True)
    xg = x.detach().cuda().bfloat16().requires_grad_()
    out = gpu(xg)
    out.float().square().mean().backward()
    assert _rel(out, ref(x).detach()) < 2e-2
    assert _rel(xg.grad, x.grad) < 5e-2
    assert _rel(gpu.key_tokens.grad, ref.key_tokens.grad) < 5e-2
    assert _rel(gpu.value_tokens.grad, ref.value_tokens.grad) < 5e-2


@pytest.fixture(scope="module")
def cpu_reference(minipile, tmp_path_factory):
    """The one-process fp32 run on the CPU that every GPU layout is held to (the same global batch)."""
    return run_ranks(1, train, debug_overrides(minipile, tmp_path_factory.mktemp("cpu"), **{"train.steps": 3}))[0]


def _tracks(gpu: list[dict], cpu: list[dict]) -> None:
    """bf16 on the GPU within bf16 rounding of fp32 on the CPU, step by step."""
    assert [g["step"] for g in gpu] == [c["step"] for c in cpu]
    for g, c in zip(gpu, cpu):
        assert abs(g["loss"] - c["loss"]) <= 2e-2 * c["loss"], (g["step"], g["loss"], c["loss"])
        assert abs(g["grad_norm"] - c["grad_norm"]) <= 1e-1 * c["grad_norm"], (g["step"], g["grad_norm"], c["grad_norm"])
        assert 0 < g["mfu"] < 1


GPU_LAYOUTS = {  # name: (GPUs, overrides), each over NCCL, one GPU per rank, the baseline's global batch
    "one_gpu": (1, {}),
    "one_gpu_fused_pattention": (1, {"train.fused_pattention": True}),
    "one_gpu_compile": (1, {"train.compile": True}),
    "tp2": (2, {"parallel.tp": 2}),
    "pp2": (2, {"parallel.pp": 2}),
    "dp2": (2, {"train.grad_accum_steps": 1}),
    "tp2_sequence_parallel": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    "tp2_compile": (2, {"parallel.tp": 2, "train.compile": True}),
    "tp2_pp2": (4, {"parallel.tp": 2, "parallel.pp": 2}),
    "cp2": (2, {"parallel.cp": 2}),  # K and V all-gathered over NCCL, flash attention on the causal chunks
    "cp2_tp2": (4, {"parallel.cp": 2, "parallel.tp": 2}),
}


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_chunks_run_flash_attention_and_equal_full_attention(cp):
    """Every CP rank's two query chunks (attend_chunks, bottom-right causal) in bf16 under SDPA restricted to flash
    attention, so no mask exists: outputs and q gradients equal full causal attention's rows, and the k and v
    gradients summed over the ranks equal full attention's, within 1e-2 of their scale (bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    T = 1024
    q, k, v, grad = (torch.randn(2, 8, T, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    mine_k, mine_v = k.float().requires_grad_(), v.float().requires_grad_()  # the ranks' gradients summed in fp32
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True)
        (y * grad).sum().backward()
        for rank in range(cp):
            idx = chunk_index(T, cp, rank).cuda()
            mine_q = q[:, :, idx].clone().requires_grad_()
            y_mine = attend_chunks(mine_q, mine_k.bfloat16(), mine_v.bfloat16(), cp, rank)
            (y_mine * grad[:, :, idx]).sum().backward()
            assert _rel(y_mine, y[:, :, idx]) < 1e-2
            assert _rel(mine_q.grad, full[0].grad[:, :, idx]) < 1e-2
    assert _rel(mine_k.grad, full[1].grad) < 1e-2 and _rel(mine_v.grad, full[2].grad) < 1e-2


@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
def test_layout_on_gpus_tracks_fp32_on_cpu(name, minipile, cpu_reference, tmp_path):
    world, extra = GPU_LAYOUTS[name]
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, {GPUS} visible")
    hist = run_ranks(world, train, debug_overrides(minipile, tmp_path, **{"train.steps": 3, "train.device": "cuda",
                                                                         **extra}))[0]
    _tracks(hist, cpu_reference)


def test_documents_on_a_gpu_track_fp32_on_cpu(minipile, tmp_path):
    """Packed documents kept apart (all three data flags) on the GPU: SDPA with an additive mask (its
    memory-efficient kernel) in bf16 against the same flags in fp32 on the CPU."""
    cpu = run_ranks(1, train, debug_overrides(minipile, tmp_path / "cpu", **{"train.steps": 3, **DOCUMENTS}))[0]
    gpu = run_ranks(1, train, debug_overrides(minipile, tmp_path / "gpu", **{"train.steps": 3, "train.device": "cuda",
                                                                            **DOCUMENTS}))[0]
    _tracks(gpu, cpu)


def test_layout_free_load_then_a_fused_adam_step_on_the_gpu(minipile, cpu_reference, tmp_path):
    """Adam's state from a layout-free checkpoint (every resharded or grown checkpoint, every resume at another
    layout) on the GPU: fused AdamW steps with it, and the run continues as the CPU one does. With 2 GPUs the resume
    is also at another layout (TP=2)."""
    kw = {"train.steps": 3, "train.device": "cuda"}
    run_ranks(1, train, debug_overrides(minipile, tmp_path / "a", **kw, **{"train.exit_after_steps": 2}))
    layout_free = str(tmp_path / "a" / "checkpoints" / "global_step2")  # every checkpoint is layout-free
    world, extra = (2, {"parallel.tp": 2}) if GPUS >= 2 else (1, {})
    rest = run_ranks(world, train, debug_overrides(minipile, tmp_path / "b", **kw, **extra,
                                                   **{"checkpoint.load": layout_free}))[0]
    _tracks(rest, cpu_reference[2:])


def _srun_task(minipile, run_dir, procid: int, ntasks: int, localid: int, gpu: int, port: int, extra: dict):
    """One task as `srun --gpus-per-task=1` starts it: its SLURM_* variables, one GPU visible as cuda:0."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_PROCID=str(procid), SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_LOCALID=str(localid),
               SLURM_STEP_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               CUDA_VISIBLE_DEVICES=str(gpu))
    args = _args(debug_overrides(minipile, run_dir, **{"train.steps": 2, "train.device": "cuda", **extra}))
    return subprocess.Popen([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("tasks", [1, 2])
def test_srun_tasks_with_one_visible_gpu_each(minipile, tmp_path, tasks):
    """Every task sees its GPU as cuda:0 whatever its local rank (DeepSpeed takes cuda:LOCAL_RANK): one task at local
    rank 3 (as the fourth task of a node), and with 2 GPUs two tasks at TP=2 over NCCL."""
    if GPUS < tasks:
        pytest.skip(f"needs {tasks} GPUs, {GPUS} visible")
    port = _free_port()
    extra = {"parallel.tp": 2} if tasks == 2 else {}
    procs = [_srun_task(minipile, tmp_path, r, tasks, 3 - r if tasks == 1 else r + 2, r, port, extra)
             for r in range(tasks)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
