"""Who am I: rank discovery from torchrun / the deepspeed launcher, Slurm, or MPI; process-group setup.

Sources, first match wins:
  1. torchrun / `deepspeed` launcher (also `deepspeed --hostfile ... --no_ssh --node_rank K`):
     RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
  2. Open MPI's `mpirun` (OMPI_COMM_WORLD_*): through mpi4py, as `deepspeed.init_distributed(
     auto_mpi_discovery=True)` does. Checked before Slurm: `mpirun` inside an allocation starts its
     daemons with `srun`, so the SLURM_* variables its ranks inherit describe the daemons, not the ranks.
  3. A Slurm job step (`srun`; SLURM_STEP_ID set): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; the master
     is the step's first host (`scontrol show hostnames`), the port MASTER_PORT or 20000 + job id % 20000.
     A batch script itself has SLURM_PROCID=0 but no step id: it is not a rank.
  4. Another MPI's launcher (PMI_RANK/PMI_SIZE of MPICH's hydra, Intel MPI; PMIX_RANK of PRRTE):
     through mpi4py.
  5. Nothing set: a single process.
MASTER_ADDR and MASTER_PORT, when set, win over what a source would derive.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lora_ds.errors import UserError

DEFAULT_PORT = 29500
# DeepSpeed's ops build in well under this; a build lock older than that was left by a killed build.
STALE_BUILD_LOCK_S = 600


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str


def slurm_hostnames(nodelist: str) -> list[str]:
    """A Slurm host list (`n[1-3],gpu7`) expanded by Slurm itself."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()


def _slurm_env(env) -> DistEnv:
    # With the default block distribution rank 0 runs on the step's first node.
    master = env.get("MASTER_ADDR") or slurm_hostnames(env.get("SLURM_STEP_NODELIST", env["SLURM_JOB_NODELIST"]))[0]
    port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
    return DistEnv(
        int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), master, port, "slurm"
    )


def _mpi_env(env) -> DistEnv:
    """Ranks from MPI_COMM_WORLD; the master is rank 0's host name; local rank = rank among its host's ranks."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    hosts = comm.allgather(host)
    local = hosts[:rank].count(host)
    return DistEnv(
        rank, local, world, env.get("MASTER_ADDR") or hosts[0], int(env.get("MASTER_PORT") or DEFAULT_PORT), "mpi"
    )


def in_slurm_step(env) -> bool:
    """Whether this process is a task of a Slurm job step (srun), rather than a batch script or an MPI rank."""
    if not all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")):
        return False
    # A PMI launcher (e.g. hydra's mpiexec) run inside a step sets a PMI_SIZE of its own; under
    # `srun --mpi=pmi2` the two agree.
    return env.get("PMI_SIZE", env["SLURM_NTASKS"]) == env["SLURM_NTASKS"]


def discover(env=None) -> DistEnv:
    """This process's place in the job, from the environment of whichever launcher started it."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", DEFAULT_PORT)),
            "torchrun",
        )
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _mpi_env(env)
    if in_slurm_step(env):
        return _slurm_env(env)
    if "PMI_SIZE" in env or "PMIX_RANK" in env:
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
    check_build_locks()
    os.environ.update(
        RANK=str(info.rank),
        LOCAL_RANK=str(info.local_rank),
        WORLD_SIZE=str(info.world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(info.local_rank)
    backend = accel.communication_backend_name()
    if accel.device_name() == "cpu":
        backend = "gloo"  # the CPU accelerator names oneCCL, which plain torch builds lack
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    if accel.device_name() == "cpu":
        _unlink_shm_buffer(info)
    return info


def stale_build_locks(root: str | None = None) -> list[Path]:
    """Lock files of torch JIT extension builds (DeepSpeed's ops) older than STALE_BUILD_LOCK_S."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    return sorted(p for p in root.glob("*/*/lock") if now - p.stat().st_mtime > STALE_BUILD_LOCK_S)


def check_build_locks(root: str | None = None) -> None:
    """torch waits forever on the lock of a build that was killed: say so instead of hanging."""
    stale = stale_build_locks(root)
    if stale:
        minutes = (time.time() - stale[0].stat().st_mtime) / 60
        raise UserError(
            f"{stale[0]} is {minutes:.0f} min old: a build of DeepSpeed's ops was killed and every "
            "later run would wait on it forever; delete the file (when no other build is running) "
            "and relaunch"
        )


def _unlink_shm_buffer(info: DistEnv) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm buffer per rank and never unlinks it. Once every rank
    has mapped its peers' (they have all returned from init), each rank unlinks the name of its own: the
    mappings stay valid and the memory goes back when the job ends, even on kill -9."""
    import torch.distributed as dist

    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{info.master_addr}_{info.master_port}_{info.rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def ranks_per_node() -> int:
    """How many ranks share this rank's host (collective once the process group is up; 1 before). Every host
    must run as many: ZeRO++'s per-node partitions need equal nodes."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 1
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    counts = {h: hosts.count(h) for h in hosts}
    if len(set(counts.values())) != 1:
        raise UserError(
            f'ranks per host differ ({counts}); zero_hpz_partition_size "auto" needs the same number '
            "of ranks on every node: set it explicitly or launch equal nodes"
        )
    return counts[socket.gethostname()]


def shutdown() -> None:
    """Wait for every rank, then tear the process group down. Collective. A rank that exits while its peers still
    work leaves gloo threads talking to a closed socket, which can abort a peer at exit ("terminate called
    without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
