"""Who am I: rank discovery from torchrun / the deepspeed launcher, Slurm, or MPI; process-group setup.

Sources, first match wins:
  1. torchrun / `deepspeed` launcher: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
  2. Slurm (`srun`): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; master = first host of SLURM_JOB_NODELIST
     (expanded with `scontrol show hostnames`), port from MASTER_PORT or derived from SLURM_JOB_ID.
  3. MPI (`mpirun`): OMPI_COMM_WORLD_* / PMI_* / PMIX_*; ranks and the master host through mpi4py,
     as `deepspeed.init_distributed(auto_mpi_discovery=True)` does.
  4. Nothing set: a single process.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str


def _slurm_master(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


def _mpi_env(env) -> DistEnv:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    master = comm.bcast(socket.gethostbyname(socket.gethostname()) if rank == 0 else None, root=0)
    local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", env.get("PMIX_LOCAL_RANK",
                                                                                             rank))))
    return DistEnv(rank, local, world, env.get("MASTER_ADDR", master),
                   int(env.get("MASTER_PORT", DEFAULT_PORT)), "mpi")


def discover(env=None) -> DistEnv:
    """This process's place in the job, from the environment of whichever launcher started it."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        master = env.get("MASTER_ADDR") or _slurm_master(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       master, port, "slurm")
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return _mpi_env(env)
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", _free_port())), "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Export the discovered env as torch.distributed expects it, then start DeepSpeed's process group."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    info = discover()
    os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(info.local_rank)
    backend = accel.communication_backend_name()
    if accel.device_name() == "cpu":
        backend = "gloo"  # the CPU accelerator names oneCCL, which plain torch builds lack
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    return info


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
