"""A real two-node Slurm cluster on this one host, for tests: Debian's slurmctld and two slurmd (n1, n2).

It runs as root with no systemd and no munge daemon (auth/none, cred/none); each node is a `slurmd -D -N
NAME` on its own port, all at 127.0.0.1. `start()` writes slurm.conf under `root`, adds the node names to
/etc/hosts (so a rank can reach the master by its node name, as on a real cluster) and starts the three
daemons; `stop()` cancels any job left, stops the daemons by PID and puts /etc/hosts back as it was.
Clients find the cluster through SLURM_CONF (`env()`, which is also the CPU-rank environment of helpers.cpu_env:
jobs inherit it); nothing is written under /etc/slurm.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from helpers import cpu_env, require_mark

HOSTS = Path("/etc/hosts")
CTLD_PORT = 17000
NODE_PORTS = (17001, 17002)


def _host_resources() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd itself measures this host."""
    out = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout
    return int(re.search(r"CPUs=(\d+)", out).group(1)), int(re.search(r"RealMemory=(\d+)", out).group(1))


class SlurmCluster:
    """Two nodes, n1 and n2, each with all of this host's CPUs; one partition `debug` whose CPUs jobs share."""

    nodes = ("n1", "n2")

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self._hosts_before: str | None = None

    def env(self, **extra) -> dict:
        return cpu_env(SLURM_CONF=self.conf, **extra)

    def _write_conf(self) -> None:
        cpus, mem = _host_resources()
        r = self.root
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=loradstest
SlurmctldHost=localhost
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port={NODE_PORTS[0]}-{NODE_PORTS[1]} \
CPUs={cpus} RealMemory={mem} State=UNKNOWN
# Up to 4 jobs share a CPU: tests run several small jobs at once.
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _add_hosts(self) -> None:
        self._hosts_before = HOSTS.read_text()
        # Written in place: /etc/hosts is often a bind mount, which a rename would not replace.
        HOSTS.write_text(self._hosts_before.rstrip("\n") + f"\n127.0.0.1 {' '.join(self.nodes)}  # lora-ds tests\n")

    def _restore_hosts(self) -> None:
        if self._hosts_before is not None:
            HOSTS.write_text(self._hosts_before)
            self._hosts_before = None

    def start(self, timeout: float = 60) -> None:
        require_mark("cluster")
        for port in (CTLD_PORT, *NODE_PORTS):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise RuntimeError(f"port {port} is taken: is another Slurm running? (ss -ltnp)")
        self._write_conf()
        self._add_hosts()
        log = open(self.root / "log" / "daemons.out", "ab")
        cmds = [["slurmctld", "-D"], *(["slurmd", "-D", "-N", n] for n in self.nodes)]
        for cmd in cmds:
            self.procs.append(subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            states = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
            if states.count("idle") == len(self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm did not come up within {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what is left, stop the daemons by PID, restore /etc/hosts; safe to call twice."""
        try:
            if self.procs and self.procs[0].poll() is None:
                self.run(["scancel", "--partition=debug"], check=False)
                deadline = time.monotonic() + 30
                while self.run(["squeue", "-h"], check=False).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
            for p in reversed(self.procs):  # the slurmd's first: they report to slurmctld
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.procs.clear()
        finally:
            self._restore_hosts()

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = kw.pop("env", None) or self.env()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict of its Key=Value fields."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted((self.root / "log").glob("*")))
