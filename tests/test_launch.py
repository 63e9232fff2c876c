"""Rank discovery: one function reads every launcher's variables and keeps a given MASTER_ADDR; host settings."""
import os
import subprocess
import sys

import pytest
import torch

from tokenformer_mp.parallel.launch import LaunchError, device_index, discover, launch_variables


def test_torchrun():
    le = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"})
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == \
        ("torchrun/deepspeed", 3, 4, 1, "127.0.0.1", 1234)


def test_srun_takes_the_first_host_of_the_node_list():
    env = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "17",
           "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_NODELIST": "n[1-2]"}
    le = discover(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == \
        ("srun", 2, 4, 0, "n1", 29517)


def test_srun_keeps_a_given_master_addr():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "gpu[7-8]",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "4000"}
    le = discover(env)
    assert (le.master_addr, le.master_port) == ("127.0.0.1", 4000)


def test_a_batch_script_without_srun_is_one_process():
    le = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"})
    assert (le.launcher, le.world_size) == ("single", 1)


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "5000"}
    le = discover(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr) == ("mpirun", 1, 2, 1, "127.0.0.1")


def test_single_process_gets_loopback_and_a_free_port():
    le = discover({})
    assert (le.launcher, le.rank, le.world_size, le.master_addr) == ("single", 0, 1, "127.0.0.1") and le.master_port > 0


def _bound(env: dict, visible: int) -> tuple[int, dict]:
    """What one process of a launch does before any library starts: its ranks from the launcher's variables, the
    GPU it takes of the `visible` ones (device_index, as pick_device does), the variables it exports."""
    le = discover(env, mpi_world=_no_mpi)
    index = device_index(le.local_rank, visible)
    return le.rank, launch_variables(le, torch.device("cuda", index), env)


def _no_mpi():
    raise AssertionError("mpi4py consulted although the environment had every value")


NODE = {"MASTER_ADDR": "n1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("visible", [1, 4])  # 1: srun --gpus-per-task=1 / --gpu-bind / a per-task CUDA_VISIBLE_DEVICES
@pytest.mark.parametrize("launcher", ["srun", "torchrun", "mpirun", "mpich"])
def test_every_task_of_a_node_binds_its_own_visible_gpu(launcher, visible):
    """4 tasks on the second of two nodes. DeepSpeed binds cuda:LOCAL_RANK (init_process_group's device_id, the
    engine's set_device, PipelineModule.to): with one GPU visible per task that must be 0 on every task, or each task
    but the first dies with 'invalid device ordinal'; with four visible, the node-local rank's."""
    for local in range(4):
        rank = 4 + local
        env = {"srun": {"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": str(local), **NODE},
               "torchrun": {"RANK": str(rank), "WORLD_SIZE": "8", "LOCAL_RANK": str(local), **NODE},
               "mpirun": {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "8",
                          "OMPI_COMM_WORLD_LOCAL_RANK": str(local), **NODE},
               "mpich": {"PMI_RANK": str(rank), "PMI_SIZE": "8", "MPI_LOCALRANKID": str(local), **NODE}}[launcher]
        got_rank, exported = _bound(env, visible)
        want = str(0 if visible == 1 else local)
        assert got_rank == rank and exported["RANK"] == str(rank) and exported["WORLD_SIZE"] == "8"
        assert exported["LOCAL_RANK"] == want, (launcher, local, exported)
        if launcher == "mpirun":  # DeepSpeed's engine asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK
            assert exported["OMPI_COMM_WORLD_LOCAL_RANK"] == want


def test_deepspeed_takes_the_exported_index_as_its_device():
    """The other end of the contract: DeepSpeed's CUDA accelerator names cuda:LOCAL_RANK (no GPU needed to ask)."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
    le = discover({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "3", **NODE})
    exported = launch_variables(le, torch.device("cuda", device_index(le.local_rank, 1)), {})
    assert CUDA_Accelerator().device_name(int(exported["LOCAL_RANK"])) == "cuda:0"


def test_more_tasks_than_visible_gpus_is_an_error():
    with pytest.raises(LaunchError, match="local rank 4 but only 4 GPUs are visible"):
        device_index(4, 4)
    with pytest.raises(LaunchError, match="no CUDA device"):
        device_index(0, 0)


def test_cpu_ranks_keep_their_node_local_rank():
    le = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", **NODE})
    assert launch_variables(le, torch.device("cpu"), {})["LOCAL_RANK"] == "1"


def test_mpich_ranks_come_from_the_environment():
    le = discover({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "2", **NODE}, mpi_world=_no_mpi)
    assert (le.launcher, le.rank, le.world_size, le.local_rank) == ("mpirun", 2, 4, 2)


# mpirun/mpiexec in an allocation: 2 nodes x 4 ranks; each node's daemon is task <node> of a 2-task srun step, and
# the ranks it starts inherit that step's SLURM_*.
_DAEMON = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[1-2]", **NODE}


@pytest.mark.parametrize("mpi", [
    lambda rank: {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "8",
                  "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % 4)},
    lambda rank: {"PMI_RANK": str(rank), "PMI_SIZE": "8", "MPI_LOCALRANKID": str(rank % 4)}], ids=["ompi", "hydra"])
def test_mpirun_inside_a_slurm_allocation_takes_the_mpi_ranks(mpi):
    """Every rank, the first of each node included (its SLURM_PROCID equals its MPI rank on node 0), takes its rank
    and the world of 8 from the MPI launcher, not the daemon's node index and node count."""
    got = [discover({"SLURM_PROCID": str(rank // 4), **_DAEMON, **mpi(rank)}, mpi_world=_no_mpi)
           for rank in range(8)]
    assert [(le.launcher, le.rank, le.world_size, le.local_rank) for le in got] == \
        [("mpirun", rank, 8, rank % 4) for rank in range(8)]


@pytest.mark.parametrize("mpi", ["PMIX_RANK", "PMI_RANK"])
def test_srun_with_an_mpi_plugin_stays_srun(mpi):
    """srun --mpi=pmix (or pmi2) sets the MPI rank beside SLURM_PROCID, equal on every task: still srun."""
    got = [discover({"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": str(rank % 4),
                     mpi: str(rank), **NODE}) for rank in range(8)]
    assert [(le.launcher, le.rank, le.world_size, le.local_rank) for le in got] == \
        [("srun", rank, 8, rank % 4) for rank in range(8)]


@pytest.mark.parametrize("env", [{"PMI_RANK": "2", "PMI_SIZE": "4"}, {"PMIX_RANK": "2"}])
def test_mpi4py_that_disagrees_with_the_launcher_is_refused(env):
    """mpi4py built against another MPI starts every process as rank 0 of 1 (a singleton): N runs would each think
    they are the whole job. Here mpi4py really is asked (in a child process: MPI_Init) and really says 0 of 1."""
    code = ("import sys; from tokenformer_mp.parallel.launch import discover, LaunchError\n"
            "try:\n    discover()\nexcept LaunchError as e:\n    print(e); sys.exit(7)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_", "MASTER_"))
             and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 7, res.stdout + res.stderr
    assert "mpi4py says rank 0 of 1" in res.stdout and "rank 2" in res.stdout and "MASTER_ADDR" in res.stdout


_HOST_MEMORY = """
import ctypes, sys, torch
from tokenformer_mp.parallel.launch import hold_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
held = hold_freed_host_memory() if sys.argv[1] == "hold" else None
mapped = mallinfo2().hblkhd
t = torch.ones(5 << 20)  # 20 MiB
mapped = mallinfo2().hblkhd - mapped
del t
kept = mallinfo2().fordblks
print(held, mapped >> 20, kept >> 20)
"""


def _host_memory(mode: str, **extra_env) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    return subprocess.run([sys.executable, "-c", _HOST_MEMORY, mode], env={**env, **extra_env}, check=True,
                          capture_output=True, text=True).stdout.splitlines()[-1].split()  # after import-time logs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_host_memory_stays_in_the_process():
    # glibc's default: a fresh 20 MiB block is a mapping of its own, unmapped when freed (and faulted in next time)
    held, mapped, kept = _host_memory("default")
    assert (held, mapped, int(kept) < 20) == ("None", "20", True)  # what imports left free is not the block
    # held: it comes from the heap and stays there when freed, for the next step's tensors
    held, mapped, kept = _host_memory("hold")
    assert (held, mapped, int(kept) >= 20) == ("True", "0", True)
    # a user's own allocator settings win
    assert _host_memory("hold", MALLOC_ARENA_MAX="2")[0] == "False"


def _side_group_backends(tp: int, pp: int) -> list:
    import torch.distributed as dist

    from tokenformer_mp.parallel import groups
    dist.init_process_group("gloo")
    asked, new_group = [], dist.new_group

    def recording(*args, **kwargs):  # test instrumentation: which backend each of megatron's groups asks for
        asked.append(kwargs.get("backend"))
        return new_group(*args, **kwargs)

    dist.new_group = recording
    try:
        groups.initialize(tp, pp, timeout_s=90)
    finally:
        dist.new_group = new_group
        dist.destroy_process_group()
    return asked


def test_no_gloo_side_groups():
    """megatron-core makes a gloo twin of the data-parallel groups by default, which across nodes needs TCP between
    hosts besides NCCL's network; nothing here uses them, so none is created."""
    from tokenformer_mp.parallel.local import run_ranks
    asked = run_ranks(2, _side_group_backends, 2, 1)[0]
    assert len(asked) > 5 and "gloo" not in asked, asked


def test_cpu_process_group_compiles_nothing(tmp_path):
    """deepspeed.init_distributed on a CPU loads DeepSpeed's shared-memory comm op; tools/setup_env.sh builds it into
    .venv, so no run JIT-compiles it (a run killed mid-compile leaves torch's build lock, and every later run on the
    machine waits on it forever). Checked with an empty extensions folder: nothing is built into it."""
    code = ("import torch.distributed as dist, deepspeed\n"
            "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
            "deepspeed.init_distributed(dist_backend='gloo', auto_mpi_discovery=False)\n")
    ext = tmp_path / "torch_extensions"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert not ext.exists() or not any(ext.iterdir()), f"JIT-compiled {sorted(ext.rglob('*'))}: run tools/setup_env.sh"
