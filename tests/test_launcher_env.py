"""Rank layout resolution from torchrun, deepspeed, mpirun and srun environments."""

from __future__ import annotations

import pytest

from launcher.env import LaunchEnvError, expand_nodelist, resolve_dist_env


def test_single_process_without_launcher():
    d = resolve_dist_env({})
    assert (d.rank, d.world_size, d.local_rank, d.source) == (0, 1, 0, "single")


def test_torchrun_and_deepspeed_launcher():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "1234",
    }
    d = resolve_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (3, 4, 1, 2)
    assert (d.master_addr, d.master_port, d.source) == ("node0", 1234, "torchrun")


def test_partial_torchrun_env_is_an_error():
    with pytest.raises(LaunchEnvError, match=r"WORLD_SIZE.*missing"):
        resolve_dist_env({"RANK": "0"})


def test_openmpi():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "99",
    }
    d = resolve_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.source) == (5, 8, 1, 4, "mpi")


def test_srun_task_per_rank():
    env = {
        "SLURM_PROCID": "6",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    d = resolve_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.source) == (6, 8, 2, 4, "slurm")
    assert d.master_addr == "gpu07" and d.master_port == 20000 + 4242


def test_srun_with_slurms_pmi2_plugin_maps_each_rank_to_its_own_gpu():
    """Clusters with MpiDefault=pmi2: Slurm's pmi2 plugin gives every task PMI_RANK and PMI_SIZE (gtaskid,
    ntasks) but no local rank; the task's GPU is its SLURM_LOCALID, not 0 on every rank of a node."""
    env = {"PMI_RANK": "13", "PMI_SIZE": "64", "PMI_FD": "7", "SLURM_PROCID": "13", "SLURM_NTASKS": "64",
           "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "g[1-8]",
           "SLURM_STEP_TASKS_PER_NODE": "8(x8)"}
    d = resolve_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (13, 64, 5, 8)
    hydra = {"PMI_RANK": "13", "PMI_SIZE": "64", "MPI_LOCALRANKID": "5", "MPI_LOCALNRANKS": "8"}
    assert (resolve_dist_env(hydra).local_rank, resolve_dist_env(hydra).source) == (5, "mpi")  # mpirun's


def test_launchers_that_disagree_on_the_local_rank_are_an_error():
    env = {"RANK": "13", "WORLD_SIZE": "64", "LOCAL_RANK": "0", "SLURM_PROCID": "13", "SLURM_NTASKS": "64",
           "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "g[1-8]"}
    with pytest.raises(LaunchEnvError, match=r"rank 13/64 \(local 0\).*rank 13/64 \(local 5\)"):
        resolve_dist_env(env)


def test_batch_shell_is_not_a_rank():
    assert (
        resolve_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).source == "single"
    )


def test_torchrun_inside_srun_per_node_is_fine():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    assert resolve_dist_env(env).rank == 5


def test_disagreeing_launchers_are_an_error():
    env = {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "n1",
    }
    with pytest.raises(LaunchEnvError, match="launchers disagree"):
        resolve_dist_env(env)


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("a1,b[9-10]") == ["a1", "b9", "b10"]
