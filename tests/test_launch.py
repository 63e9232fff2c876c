"""Rank discovery: one function reads every launcher's variables and keeps a given MASTER_ADDR; host settings."""
import os
import subprocess
import sys

import pytest

from tokenformer_mp.parallel.launch import discover


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


def test_local_rank_before_the_process_group():
    from tokenformer_mp.parallel.launch import local_rank
    assert local_rank({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_LOCALID": "0"}) == 1  # torchrun in srun
    assert local_rank({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1"}) == 1
    assert local_rank({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == 1
    assert local_rank({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}) == 0  # a batch script without srun
    assert local_rank({}) == 0


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
                          capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_host_memory_stays_in_the_process():
    # glibc's default: a fresh 20 MiB block is a mapping of its own, unmapped when freed (and faulted in next time)
    assert _host_memory("default") == ["None", "20", "0"]
    # held: it comes from the heap and stays there when freed, for the next step's tensors
    held, mapped, kept = _host_memory("hold")
    assert (held, mapped, int(kept) >= 20) == ("True", "0", True)
    # a user's own allocator settings win
    assert _host_memory("hold", MALLOC_ARENA_MAX="2")[0] == "False"
