"""The GPU path (CUDA, bf16, SDPA's flash kernel, NCCL) against the CPU one. Skipped where no CUDA GPU is present."""
import copy

import pytest
import torch

from tests.conftest import debug_overrides
from tests.runs import train
from tokenformer_mp.model import Pattention
from tokenformer_mp.parallel.local import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


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


@pytest.mark.parametrize("options", [{}, {"train.fused_pattention": True}, {"train.compile": True}])
def test_debug_training_on_gpu_tracks_cpu(minipile, tmp_path, options):
    """Three steps on the GPU (bf16 via DeepSpeed, NCCL world of one) follow fp32 on the CPU within bf16 rounding:
    eager, with the compiled Pattention kernels and with compiled blocks (Triton either way)."""
    cpu = run_ranks(1, train, debug_overrides(minipile, tmp_path / "cpu", **{"train.steps": 3}))[0]
    gpu = run_ranks(1, train, debug_overrides(minipile, tmp_path / "gpu", **{"train.steps": 3, "train.device": "cuda",
                                                                              **options}))[0]
    for g, c in zip(gpu, cpu):
        assert abs(g["loss"] - c["loss"]) <= 2e-2 * c["loss"], (g["step"], g["loss"], c["loss"])
        assert 0 < g["mfu"] < 1
