"""Open MPI's `mpirun` (Debian's, as root): ranks found through mpi4py, and launcher/train.py on 2 MPI ranks."""

from __future__ import annotations

import json
import socket
import sys
import tempfile

import pytest
from helpers import PROGRAMS, TRAINER, metric_steps, mpirun, read_reports, train_args

pytestmark = pytest.mark.cluster


def probe(*mpirun_opts: str, drop: tuple[str, ...] = ()) -> list[dict]:
    """What discover() finds on each of 2 mpirun ranks (tests/programs/rank_probe.py)."""
    with tempfile.TemporaryDirectory() as out:
        mpirun([*mpirun_opts, sys.executable, PROGRAMS / "rank_probe.py", "--out", out, "--drop", *drop])
        return read_reports(out, "discover", 2)


def expected(master_port: int = 29500) -> list[dict]:
    host = socket.gethostname()
    return [
        dict(rank=r, local_rank=r, world_size=2, master_addr=host, master_port=master_port, source="mpi")
        for r in (0, 1)
    ]


def test_mpirun_ranks_are_found_through_mpi4py():
    assert probe() == expected()
    assert probe("-x", "MASTER_PORT=29711") == expected(29711)


def test_mpirun_inside_a_slurm_allocation_is_not_taken_for_the_slurm_step():
    """In an allocation, mpirun starts its daemons with srun: each rank inherits the daemon step's SLURM_*."""
    slurm = ["-x", "SLURM_PROCID=0", "-x", "SLURM_NTASKS=1", "-x", "SLURM_STEP_ID=0", "-x", "SLURM_JOB_ID=42"]
    assert probe(*slurm) == expected()


def test_pmix_alone_is_enough_without_open_mpi_variables():
    """What another MPI's launcher leaves (PMIX_RANK, no OMPI_COMM_WORLD_*): ranks still come from mpi4py."""
    omp = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
    assert probe(drop=omp) == expected()


@pytest.mark.distributed
def test_mpirun_trains_launcher_with_ranks_from_mpi(neox_dir, tmp_path):
    proc = mpirun(
        [sys.executable, TRAINER, *train_args(neox_dir, tmp_path, max_steps=4, micro_batch=4, lora_r=4, seed=7)],
        timeout=600,
    )
    assert proc.stdout.count("adapter written to") == 1  # rank 0 only
    resolved = json.loads((tmp_path / "run_config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["rank_source"]) == (2, "mpi")
    assert resolved["ds_config"]["train_batch_size"] == 8
    assert metric_steps(tmp_path) == [1, 2, 3, 4]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
