"""Rank discovery for every launcher, process groups, and the device: one function decides, and logs what it found.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK; srun gives SLURM_*; mpirun gives OMPI_* (or
PMI_*, or mpi4py). We export the standard variables ourselves so DeepSpeed never replaces a given MASTER_ADDR with a
discovered one.
"""
from __future__ import annotations

import ctypes
import datetime
import logging
import os
import socket
import subprocess
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator, set_accelerator
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

from ..config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "n[1-2],x" -> "n1" without scontrol
        head = nodelist.split(",")[0]
        if "[" in head:
            base, rng = head.split("[", 1)
            return base + rng.split("-")[0].split(",")[0].rstrip("]")
        return head


class LaunchError(ConfigError):
    """The launch environment cannot work (ranks that disagree, a device that does not exist); names what to fix.
    Bad input like a config error: the trainer exits 2 with its message."""


def _mpi4py_world() -> tuple[int, int]:
    from mpi4py import MPI  # MPI_Init: only when the environment lacks what we need
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def _mpi_ranks(env: dict[str, str]) -> tuple[int, int | None, int, str]:
    """(rank, world size or None, local rank, variables) from an MPI launcher's environment: Open MPI's OMPI_*,
    MPICH / Intel MPI's PMI_*, PMIx's PMIX_RANK (no size: mpi4py gives it)."""
    if "OMPI_COMM_WORLD_RANK" in env:
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), "OMPI_COMM_WORLD_RANK/SIZE")
    local = int(env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", env.get("PMIX_LOCAL_RANK", 0))))
    if "PMI_RANK" in env:
        return int(env["PMI_RANK"]), int(env["PMI_SIZE"]) if "PMI_SIZE" in env else None, local, "PMI_RANK/PMI_SIZE"
    return int(env["PMIX_RANK"]), None, local, "PMIX_RANK"


def _mpirun_in_slurm(env: dict[str, str]) -> bool:
    """True where an MPI launcher's variables sit beside SLURM_* and name another process. mpirun/mpiexec inside an
    allocation starts its per-node daemons with srun, so the ranks inherit the daemon's SLURM_PROCID (the node's index)
    and SLURM_STEP_NUM_TASKS (the node count). Open MPI's mpirun is the only one that exports OMPI_COMM_WORLD_RANK
    at launch, so that alone decides; srun --mpi=pmi2/pmix sets PMI_RANK/PMIX_RANK too, but equal to SLURM_PROCID
    (and PMI_SIZE to the step's task count) on every task."""
    if "OMPI_COMM_WORLD_RANK" in env:
        return True
    rank, size = env.get("PMI_RANK", env.get("PMIX_RANK")), env.get("PMI_SIZE")
    return rank not in (None, env["SLURM_PROCID"]) or size not in (None, env["SLURM_STEP_NUM_TASKS"])


def discover(env: dict[str, str] | None = None, mpi_world=_mpi4py_world) -> LaunchEnv:
    """Rank, world size, node-local rank and rendezvous address from whichever launcher started this process.

    Under MPI the ranks come from the launcher's variables, never from mpi4py alone: mpi4py built against another MPI
    than the launcher's starts every process as rank 0 of 1, and N independent runs would share one run directory.
    mpi4py is asked only for what the environment lacks (the world size under PMIx, the rendezvous address), and
    must then agree with the environment."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 0))
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher, or set by hand
        launcher = "torchrun/deepspeed" if "LOCAL_RANK" in env else "env"
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and not _mpirun_in_slurm(env):  # srun, one task per GPU
        launcher = "srun"
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        port = port or 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000
    elif any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):  # mpirun / mpiexec
        launcher = "mpirun"
        rank, world, local, source = _mpi_ranks(env)
        if "SLURM_PROCID" in env:
            log.info("mpirun inside a Slurm allocation: rank %d from %s, not SLURM_PROCID=%s (its daemon's)", rank,
                     source, env["SLURM_PROCID"])
        addr = env.get("MASTER_ADDR")
        if world is None or addr is None or not port:
            mpi_rank, mpi_size = mpi_world()
            if (mpi_rank, mpi_size) != (rank, world if world is not None else mpi_size):
                raise LaunchError(
                    f"mpi4py says rank {mpi_rank} of {mpi_size}, the launcher's {source} say rank {rank}"
                    f"{'' if world is None else f' of {world}'}: mpi4py is built against another MPI than the one that "
                    f"launched this job (requirements.txt installs Open MPI's). Export MASTER_ADDR and MASTER_PORT "
                    f"(then mpi4py is not needed{'' if world is not None else ' once PMI_SIZE is set'}), or rebuild "
                    f"mpi4py against your MPI: pip install --no-binary=mpi4py mpi4py")
            world = mpi_size
            if addr is None or not port:
                from mpi4py import MPI  # rank 0 tells everyone where to meet
                addr, port = MPI.COMM_WORLD.bcast((addr or socket.gethostname(), port or 29500), root=0)
    else:
        launcher, rank, world, local = "single", 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = port or _free_port()
    return LaunchEnv(launcher, rank, world, local, addr, port or 29500)


def device_index(local_rank: int, visible: int) -> int:
    """Which of the GPUs this process sees it drives. One visible (srun --gpus-per-task=1, --gpu-bind, a per-task
    CUDA_VISIBLE_DEVICES): that one, cuda:0, whatever the local rank. Several: the one at the local rank."""
    if visible < 1:
        raise LaunchError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES, srun --gpus-per-task)")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise LaunchError(f"local rank {local_rank} but only {visible} GPUs are visible to this process: launch one "
                          f"task per GPU (srun --ntasks-per-node=GPUS, torchrun --nproc-per-node=GPUS)")
    return local_rank


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LaunchError("train.device=cuda but no CUDA device is visible")
        index = device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def select_accelerator(device: torch.device) -> None:
    """DeepSpeed's accelerator for the device the config chose. DeepSpeed picks CUDA by itself wherever a GPU is
    visible: train.device cpu on a GPU host would have the engine move the module to cuda:LOCAL_RANK and start NCCL
    while the batches stay on the CPU. Set before any process group or engine; DS_ACCELERATOR for child processes."""
    name = "cuda" if device.type == "cuda" else "cpu"
    if get_accelerator()._name != name:
        set_accelerator(CUDA_Accelerator() if name == "cuda" else CPU_Accelerator())
    os.environ["DS_ACCELERATOR"] = name


def launch_variables(le: LaunchEnv, device: torch.device, env: dict[str, str] | None = None) -> dict[str, str]:
    """The standard variables to export before any library starts. DeepSpeed takes the GPU index from LOCAL_RANK in
    three places (init_process_group's device_id, the engine's set_device, PipelineModule.to), so on a GPU LOCAL_RANK
    is the chosen device's index, not the node-local rank: with one visible GPU per task that is 0 on every task. The
    engine also asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK under Open MPI, so that one follows (already read)."""
    env = os.environ if env is None else env
    local = str(device.index if device.type == "cuda" else le.local_rank)
    out = dict(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=local, MASTER_ADDR=le.master_addr,
               MASTER_PORT=str(le.master_port))
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        out["OMPI_COMM_WORLD_LOCAL_RANK"] = local
    return out


def hold_freed_host_memory() -> bool:
    """Keep freed host memory in the process for reuse, as a caching allocator does; True if glibc took it.

    By default glibc unmaps every freed block over its mmap threshold and trims the heap top when it frees more than
    twice that; a CPU training step frees and re-allocates the same activations every step, so each step page-faults
    them back in. PyTorch's CUDA allocator caches for the same reason, and PyTorch's CPU tuning guide preloads
    jemalloc or tcmalloc for it. Debug config: steps 20% faster, RSS flat after ~100 steps at 6% more. Left alone: a
    preloaded allocator, the user's MALLOC_* settings.
    """
    if "malloc" in os.environ.get("LD_PRELOAD", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's; absent on musl and macOS
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # Blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap, and the heap is never trimmed.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, -1))


def init_distributed(le: LaunchEnv, device: torch.device, timeout_s: int = 600) -> None:
    """Export the launch (launch_variables) and start the default process group (NCCL on GPU, gloo on CPU)."""
    os.environ.update(launch_variables(le, device))
    select_accelerator(device)
    if device.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing a machine share its cores: one BLAS pool each of cores/ranks, not cores each.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", le.world_size if le.master_addr.startswith("127.") else 1))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        hold_freed_host_memory()
    backend, timeout = "nccl" if device.type == "cuda" else "gloo", datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized() and le.launcher == "single":
        # A world of one meets nobody: an in-process store, no port to pick (and lose to another process)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)  # over ours if made
    if le.rank == 0:
        log.info("launcher=%s world_size=%d master=%s:%d device=%s (LOCAL_RANK=%s)", le.launcher, le.world_size,
                 le.master_addr, le.master_port, device, os.environ["LOCAL_RANK"])
