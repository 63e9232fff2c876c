"""The GPU path (CUDA, bf16, SDPA's flash kernel, NCCL, Triton) against the CPU one: the tests behind the GPU check
(tools/gpu_check.sh; tokenformer_mp.bench.gpu_check.PARTS names which part runs which).

They run on the device TOKENFORMER_CHECK_DEVICE names: cuda by default, and skipped where no CUDA GPU is visible;
cpu to rehearse the check on a CPU (the same code, in fp32; the CUDA-only numerics skip). Their data is the
repository's own sample, tokenizer and dataset built here: nothing outside the checkout is needed. Each bound is
recorded beside its figure (TOKENFORMER_CHECK_RECORD) for the check's results.json, then asserted."""
import copy
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the hub (the export is a local directory)

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import REPO, debug_overrides
from tests.runs import train, train_deterministic
from tests.test_long_context import DOCUMENTS
from tests.test_training import TRANSFORMER, _args
from tokenformer_mp.hf.export import export_hf
from tokenformer_mp.inference import generate, load_model
from tokenformer_mp.model import Pattention
from tokenformer_mp.parallel.context_parallel import attend_chunks, chunk_index
from tokenformer_mp.parallel.local import _free_port, run_ranks

DEVICE = os.environ.get("TOKENFORMER_CHECK_DEVICE", "cuda")
GPUS = torch.cuda.device_count() if DEVICE == "cuda" and torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and GPUS == 0, reason="needs a CUDA GPU")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels on a GPU: not rehearsed on a CPU")
BF16 = DEVICE == "cuda"  # the trainer's precision auto: bf16 on a GPU, fp32 on a CPU


def record(figure: str, value: float, bound: float) -> None:
    """Write `value <= bound` to the check's figures (when the check runs this test), then assert it."""
    ok = value <= bound
    path = os.environ.get("TOKENFORMER_CHECK_RECORD")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "figure": figure, "value": value, "bound": bound, "ok": ok}) + "\n")
    assert ok, f"{figure}: {value:.4g} > {bound:.4g}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def _on_device(data: dict, run_dir, **kw) -> dict:
    return debug_overrides(data, run_dir, **{"train.device": DEVICE, **kw})


# --- part b: one device, trained, stopped, resumed ------------------------------------------------------------------
RESUME = {"train.steps": 25}


@pytest.fixture(scope="module")
def unbroken(sample, tmp_path_factory):
    """The run that never stops, twice: whether the device reproduces a run at all (the resume is held to that)."""
    return [run_ranks(1, train_deterministic, _on_device(sample, tmp_path_factory.mktemp(f"unbroken{i}"),
                                                         **RESUME))[0] for i in range(2)]


@pytest.mark.parametrize("save", ["sync", "async"])
def test_resume_is_bit_exact_on_the_device(sample, unbroken, tmp_path, save):
    """20 steps, a checkpoint, a stop; 5 more from it: every loss and grad norm equals the unbroken run's, bit for bit
    (where the device reproduces its own unbroken run; otherwise within that run-to-run difference)."""
    kw = {**RESUME, "checkpoint.async_save": save == "async"}
    first = run_ranks(1, train_deterministic, _on_device(sample, tmp_path, **kw, **{"train.exit_after_steps": 20}))[0]
    rest = run_ranks(1, train_deterministic, _on_device(sample, tmp_path, **kw))[0]
    assert [h["step"] for h in first] == list(range(1, 21)) and [h["step"] for h in rest] == list(range(21, 26))
    ref, again = unbroken
    for key in ("loss", "grad_norm"):
        noise = max(abs(a[key] - b[key]) for a, b in zip(ref, again))
        diff = max(abs(h[key] - r[key]) for h, r in zip(first + rest, ref))
        record(f"resumed {key}: largest difference from the unbroken run (bound: its run-to-run difference)", diff,
               noise)


# --- part c: Pattention's numerics in bf16 ----------------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("variant", ["eager", "eager_recompute", "fused", "fused_recompute", "compiled"])
def test_pattention_bf16_on_gpu_tracks_fp32_on_cpu(variant):
    """fused: the compiled kernels (Triton); recompute: the GELU recomputed in backward; compiled: torch.compile of
    the whole layer."""
    torch.manual_seed(0)
    ref = Pattention(256, 384, 1024)
    x = torch.randn(4, 128, 256, requires_grad=True)
    ref(x).square().mean().backward()
    gpu = copy.deepcopy(ref).cuda().bfloat16()
    gpu.fused, gpu.recompute = variant.startswith("fused"), variant.endswith("recompute")
    gpu.zero_grad(set_to_none=True)
    layer = torch.compile(gpu) if variant == "compiled" else gpu
    xg = x.detach().cuda().bfloat16().requires_grad_()
    out = layer(xg)
    out.float().square().mean().backward()
    record("output, relative to fp32", _rel(out, ref(x).detach()), 2e-2)
    for name, got, want in (("input grad", xg.grad, x.grad), ("key grad", gpu.key_tokens.grad, ref.key_tokens.grad),
                            ("value grad", gpu.value_tokens.grad, ref.value_tokens.grad)):
        record(f"{name}, relative to fp32", _rel(got, want), 5e-2)


@cuda_only
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
            record(f"rank {rank} output, relative", _rel(y_mine, y[:, :, idx]), 1e-2)
            record(f"rank {rank} q grad, relative", _rel(mine_q.grad, full[0].grad[:, :, idx]), 1e-2)
    record("k grad summed over ranks, relative", _rel(mine_k.grad, full[1].grad), 1e-2)
    record("v grad summed over ranks, relative", _rel(mine_v.grad, full[2].grad), 1e-2)


# --- parts d and h: the device against the CPU's fp32 run -----------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_reference(sample, tmp_path_factory):
    """The one-process fp32 run on the CPU that every device layout is held to (the same global batch)."""
    return run_ranks(1, train, debug_overrides(sample, tmp_path_factory.mktemp("cpu"), **{"train.steps": 3}))[0]


def _tracks(got: list[dict], cpu: list[dict]) -> None:
    """bf16 on the GPU within bf16 rounding of fp32 on the CPU, step by step (fp32 on a CPU: within 1e-5)."""
    assert [g["step"] for g in got] == [c["step"] for c in cpu]
    loss_bound, norm_bound = (2e-2, 1e-1) if BF16 else (1e-5, 1e-4)
    record("loss, largest relative difference from the CPU's fp32",
           max(abs(g["loss"] - c["loss"]) / c["loss"] for g, c in zip(got, cpu)), loss_bound)
    record("grad norm, largest relative difference from the CPU's fp32",
           max(abs(g["grad_norm"] - c["grad_norm"]) / c["grad_norm"] for g, c in zip(got, cpu)), norm_bound)
    record("mfu (above 1: a peak that read low)", max(g["mfu"] for g in got), 1.0)


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


def _layout_on_gpus(name: str, sample, tmp_path, *config: str) -> list[dict]:
    """GPU_LAYOUTS[name]'s 3 steps on the device (of `config`, the debug config by default)."""
    world, extra = GPU_LAYOUTS[name]
    if DEVICE == "cuda" and GPUS < world:
        pytest.skip(f"needs {world} GPUs, {GPUS} visible")
    return run_ranks(world, train, _on_device(sample, tmp_path, **{"train.steps": 3, **extra}), *config)[0]


@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
def test_layout_on_gpus_tracks_fp32_on_cpu(name, sample, cpu_reference, tmp_path):
    _tracks(_layout_on_gpus(name, sample, tmp_path), cpu_reference)


TRANSFORMER_GPU_LAYOUTS = ("one_gpu", "one_gpu_compile", "tp2", "pp2")  # of GPU_LAYOUTS


@pytest.fixture(scope="module")
def transformer_cpu_reference(sample, tmp_path_factory):
    return run_ranks(1, train, debug_overrides(sample, tmp_path_factory.mktemp("cpu_transformer"),
                                               **{"train.steps": 3}), TRANSFORMER)[0]


@pytest.mark.parametrize("name", TRANSFORMER_GPU_LAYOUTS)
def test_transformer_on_gpus_tracks_fp32_on_cpu(name, sample, transformer_cpu_reference, tmp_path):
    """The Transformer baseline (its Linear projections and MLP, its own TP plan) in bf16 on the device, held to its
    fp32 run on the CPU as the TokenFormer is: the comparison the scaling study makes needs both archs on the GPU."""
    _tracks(_layout_on_gpus(name, sample, tmp_path, TRANSFORMER), transformer_cpu_reference)


def test_documents_on_a_gpu_track_fp32_on_cpu(sample, tmp_path):
    """Packed documents kept apart (all three data flags) on the device: SDPA with an additive mask (its
    memory-efficient kernel on a GPU) against the same flags in fp32 on the CPU."""
    kw = {"train.steps": 3, **DOCUMENTS}
    cpu = run_ranks(1, train, debug_overrides(sample, tmp_path / "cpu", **kw))[0]
    _tracks(run_ranks(1, train, _on_device(sample, tmp_path / "dev", **kw))[0], cpu)


def test_layout_free_load_then_a_fused_adam_step_on_the_gpu(sample, cpu_reference, tmp_path):
    """Adam's state from a layout-free checkpoint (every resharded or grown checkpoint, every resume at another
    layout) on the device: fused AdamW steps with it, and the run continues as the CPU one does. With 2 GPUs the
    resume is also at another layout (TP=2)."""
    kw = {"train.steps": 3}
    run_ranks(1, train, _on_device(sample, tmp_path / "a", **kw, **{"train.exit_after_steps": 2}))
    layout_free = str(tmp_path / "a" / "checkpoints" / "global_step2")  # every checkpoint is layout-free
    world, extra = (2, {"parallel.tp": 2}) if GPUS >= 2 else (1, {})
    rest = run_ranks(world, train, _on_device(sample, tmp_path / "b", **kw, **extra,
                                              **{"checkpoint.load": layout_free}))[0]
    _tracks(rest, cpu_reference[2:])


def _srun_task(sample, run_dir, procid: int, ntasks: int, localid: int, gpu: int, port: int, extra: dict):
    """One task as `srun --gpus-per-task=1` starts it: its SLURM_* variables, one GPU visible as cuda:0."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_PROCID=str(procid), SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_LOCALID=str(localid),
               SLURM_STEP_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               CUDA_VISIBLE_DEVICES=str(gpu))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    args = _args(_on_device(sample, run_dir, **{"train.steps": 2, **extra}))
    return subprocess.Popen([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("tasks", [1, 2])
def test_srun_tasks_with_one_visible_gpu_each(sample, tmp_path, tasks):
    """Every task sees its GPU as cuda:0 whatever its local rank (DeepSpeed takes cuda:LOCAL_RANK): one task at local
    rank 3 (as the fourth task of a node), and with 2 GPUs two tasks at TP=2 over NCCL."""
    if DEVICE == "cuda" and GPUS < tasks:
        pytest.skip(f"needs {tasks} GPUs, {GPUS} visible")
    port = _free_port()
    extra = {"parallel.tp": 2} if tasks == 2 else {}
    procs = [_srun_task(sample, tmp_path, r, tasks, 3 - r if tasks == 1 else r + 2, r, port, extra)
             for r in range(tasks)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]


# --- part g: a checkpoint trained on the device, exported, run through both inference paths -------------------------
def test_export_hf_and_generate_on_the_device(sample, tmp_path):
    """The debug model trained 3 steps on the device, exported (bf16 on a GPU), loaded back by transformers and by
    the project's inference on the device: logits within the dtype's rounding of each other, greedy decoding with
    the KV cache through both (the same tokens in fp32)."""
    run_ranks(1, train, _on_device(sample, tmp_path / "run", **{"train.steps": 3}))
    ckpt, dtype = str(tmp_path / "run" / "checkpoints"), "bf16" if BF16 else "fp32"
    export_hf(ckpt, str(tmp_path / "hf"), dtype=dtype)
    ours, _ = load_model(ckpt, device=DEVICE, dtype=dtype)
    # dtype by .to(): the node's transformers may predate from_pretrained's dtype= (torch_dtype= before 4.56)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).to(
        DEVICE, torch.bfloat16 if BF16 else torch.float32)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        record("transformers' logits against ours, relative", _rel(hf(tokens).logits, ours(tokens)),
               2e-2 if BF16 else 1e-5)
        prompt = tokens[0, :16].tolist()
        mine = list(generate(ours, prompt, 32, temperature=0))
        theirs = hf.generate(tokens[:1, :16], max_new_tokens=32, do_sample=False)[0, 16:].tolist()
    eos = hf.generation_config.eos_token_id
    if eos in mine:  # transformers stops at the end-of-document id
        mine = mine[:mine.index(eos) + 1]
    assert theirs and mine
    agree = sum(a == b for a, b in zip(mine, theirs)) / max(len(mine), len(theirs))
    # bf16: two implementations' roundings can flip a near-tie argmax; fp32 decodes the same tokens
    record("greedy tokens where transformers and ours differ (share)", 1 - agree, 0.5 if BF16 else 0.0)
