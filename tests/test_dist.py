"""Rank discovery from launcher variables (lora_ds/dist.py), and a two-node `deepspeed --hostfile` launch
without ssh. Slurm's and MPI's own launchers are in test_slurm.py and test_mpi.py."""

from __future__ import annotations

import json
import os

import pytest
from helpers import finish, free_port, metric_steps, start, train_args

from lora_ds.dist import STALE_BUILD_LOCK_S, DistEnv, check_build_locks, discover, in_slurm_step
from lora_ds.errors import UserError


def test_torchrun_and_deepspeed_launcher_variables_give_the_ranks():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"}
    assert discover(env) == DistEnv(5, 1, 16, "node0", 29600, "torchrun")


def test_torchrun_started_by_srun_wins_over_the_slurm_step():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "8",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "0",
    }
    assert discover(env) == DistEnv(3, 3, 8, "127.0.0.1", 29500, "torchrun")


def test_slurm_step_gives_the_ranks_and_the_port_follows_the_job_id():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456",
        "MASTER_ADDR": "gpu07",
    }
    assert discover(env) == DistEnv(9, 1, 16, "gpu07", 23456, "slurm")
    assert discover({**env, "MASTER_PORT": "31000"}).master_port == 31000


def test_a_batch_script_is_not_a_rank():
    """sbatch's shell has SLURM_PROCID=0 and SLURM_NTASKS=16 but no step: it must not wait for 15 peers."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"}
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (0, 0, 1, "single")


def test_an_mpi_launcher_inside_a_slurm_step_is_not_taken_for_the_step():
    step = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert in_slurm_step(step)
    assert in_slurm_step({**step, "PMI_SIZE": "2"})  # srun --mpi=pmi2: the same ranks
    assert not in_slurm_step({**step, "PMI_SIZE": "16"})  # hydra's proxies, one per node, run 16 ranks


def test_no_launcher_is_a_single_process_on_a_free_port():
    info = discover({})
    assert (info.rank, info.local_rank, info.world_size, info.source) == (0, 0, 1, "single")
    assert 1024 <= info.master_port < 65536
    assert discover({"MASTER_PORT": "29999"}).master_port == 29999


@pytest.mark.distributed
def test_deepspeed_hostfile_launch_of_two_nodes_without_ssh(neox_dir, tmp_path):
    """Each "node" runs the same `deepspeed --hostfile --no_ssh --node_rank K` line, as on a cluster without
    ssh; node 0 holds rank 0 (it writes the adapter), and the two train one model together."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "run", free_port()
    args = train_args(neox_dir, out, max_steps=4, micro_batch=4, lora_r=4, seed=7)
    nodes = [
        start(
            args,
            None,
            port=port,
            log=tmp_path / f"node{k}.log",
            launcher_args=("--hostfile", hosts, "--no_ssh", "--node_rank", k, "--master_addr", "127.0.0.1"),
        )
        for k in (0, 1)
    ]
    codes = [finish(node, timeout=600, check=False).returncode for node in nodes]
    logs = [(tmp_path / f"node{k}.log").read_text() for k in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "adapter written" in logs[0] and "adapter written" not in logs[1]
    resolved = json.loads((out / "run_config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["rank_source"]) == (2, "torchrun")
    assert resolved["ds_config"]["train_batch_size"] == 8
    assert metric_steps(out) == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_a_build_lock_left_by_a_killed_build_is_an_error_not_a_hang(tmp_path):
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    check_build_locks(str(tmp_path))  # a build running now: wait on it, as torch does
    old = lock.stat().st_mtime - STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(
        UserError,
        match=r"deepspeed_shm_comm/lock is 11 min old: a build of DeepSpeed's ops was "
        r"killed .* delete the file",
    ):
        check_build_locks(str(tmp_path))
