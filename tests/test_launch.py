"""Rank discovery: one function reads every launcher's variables and keeps a given MASTER_ADDR."""
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
