"""Open MPI's `mpirun` (Debian's, as root): ranks found through mpi4py, and launcher/train.py on 2 MPI ranks."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import DEMO, REPO

MPIRUN = ["mpirun", "--allow-run-as-root", "-np", "2", "--bind-to", "none"]
# Each rank writes its own file: two ranks printing to one forwarded stdout can interleave within a line.
PROBE = ("import dataclasses, json, os; from lora_ds.dist import discover; "
         "[os.environ.pop(k) for k in {drop!r}]; d = discover(); "
         "open(os.path.join({out!r}, f'rank{{d.rank}}.json'), 'w').write(json.dumps(dataclasses.asdict(d)))")


def mpirun(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([shutil.which("mpirun"), *MPIRUN[1:], *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def probe(*mpirun_opts: str, drop: tuple[str, ...] = ()) -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        mpirun([*mpirun_opts, sys.executable, "-c", PROBE.format(drop=list(drop), out=out)])
        return sorted((json.loads(open(os.path.join(out, f)).read()) for f in os.listdir(out)),
                      key=lambda r: r["rank"])


def expected(master_port: int = 29500) -> list[dict]:
    host = socket.gethostname()
    return [dict(rank=r, local_rank=r, world_size=2, master_addr=host, master_port=master_port, source="mpi")
            for r in (0, 1)]


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
    proc = mpirun([sys.executable, str(REPO / "launcher" / "train.py"), "--model", str(neox_dir),
                   "--data", str(DEMO / "train.jsonl"), "--eval_data", "", "--output_dir", str(tmp_path),
                   "--max_steps", "4", "--dtype", "fp32", "--micro_batch", "4", "--lora_r", "4", "--seed", "7"],
                  timeout=600)
    assert proc.stdout.count("adapter written to") == 1  # rank 0 only
    resolved = json.loads((tmp_path / "run_config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["rank_source"]) == (2, "mpi")
    assert resolved["ds_config"]["train_batch_size"] == 8
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
