"""The Slurm scripts on a real two-node Slurm cluster (tests/slurm_cluster.py): rank discovery under srun,
`sbatch slurm/gpt_neox.sh` on 2 nodes, and preemption: SIGUSR1 or SIGTERM -> checkpoint -> requeue -> resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import PROGRAMS, REPO, TRAIN_DATA, adapter_tensors, assert_equal_tensors, flags, metric_steps, read_reports
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.cluster

SCRIPTS = [REPO / "slurm" / "gpt_neox.sh", REPO / "slurm" / "train.sh"]
STEPS = 20
# The tiny model on CPU, in the shape of the 20B run: LoRA with dropout (its RNG must resume too).
TRAIN_ARGS = " ".join(
    flags(
        max_steps=STEPS,
        dtype="fp32",
        micro_batch=4,
        grad_accum=2,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        lr=1e-2,
        seed=7,
        max_len=128,
        save_every=10,
    )
)
# One rank per node, one CPU per rank, no GPUs (the test cluster lets concurrent jobs share CPUs).
CPU_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def job_env(cluster: SlurmCluster, model: Path, output: Path) -> dict:
    """What the batch script reads (slurm/gpt_neox.sh's variables), in the CPU-rank environment."""
    return cluster.env(
        MODEL=model, DATA=TRAIN_DATA, EVAL_DATA="", OUTPUT=output, TRAIN_ARGS=TRAIN_ARGS, PYTHON=sys.executable
    )


def submit(cluster: SlurmCluster, args: list[str], env: dict, log: Path) -> int:
    """sbatch from the repository root, as a user would; returns the job id."""
    out = cluster.run(["sbatch", "--parsable", f"--output={log}", *args], env=env, cwd=REPO, timeout=60)
    return int(out.stdout.split()[0].split(";")[0])


def excerpt(log: str) -> str:
    """The job log without progress bars and library warnings."""
    noise = re.compile(r"^(train: |\s*return func|.*Warning)")
    return "\n".join(line for line in log.splitlines() if line.strip() and not noise.match(line))


def wait_done(cluster: SlurmCluster, job_id: int, timeout: float = 600) -> dict:
    """Poll until the job has ended for good (a requeued job passes through PENDING and runs again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {cluster.job(job_id)['JobState']} after {timeout} s")


# How a running job is stopped: the command, the signal its ranks get, and whether the batch script requeues
# the job (else Slurm does).
STOPS = {
    "usr1-before-time-limit": (["scancel", "--signal=USR1"], "SIGUSR1", True),  # what --signal=USR1@300 sends
    "sigterm-requeue": (["scontrol", "requeue"], "SIGTERM", False),  # as preemption with PreemptMode=REQUEUE
}


@pytest.fixture(scope="module")
def jobs(cluster, neox_dir, tmp_path_factory) -> dict:
    """Three jobs of slurm/gpt_neox.sh at once, 2 nodes each: "whole" by `sbatch --wait`, left alone, and one
    stopped each way of STOPS once its metrics show step 2. Per job: (scontrol record, run dir, log)."""
    root = tmp_path_factory.mktemp("jobs")
    start = time.monotonic()
    whole = subprocess.Popen(
        ["sbatch", "--wait", "--parsable", f"--output={root}/whole.out", *CPU_NODES, str(SCRIPTS[0])],
        cwd=REPO,
        env=job_env(cluster, neox_dir, root / "whole"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ids = {
        name: submit(
            cluster, [*CPU_NODES, str(SCRIPTS[0])], job_env(cluster, neox_dir, root / name), root / f"{name}.out"
        )
        for name in STOPS
    }
    waiting = dict(STOPS)
    while waiting:
        for name in list(waiting):
            if len(metric_steps(root / name, running=True)) >= 2:
                cluster.run([*waiting.pop(name)[0], str(ids[name])])
            else:
                assert cluster.job(ids[name])["JobState"] in ("PENDING", "RUNNING"), (name, cluster.logs())
        assert time.monotonic() - start < 600, cluster.logs()
        time.sleep(0.1)
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, (out, (root / "whole.out").read_text()[-4000:], cluster.logs())
    ids["whole"] = int(out.split()[0].split(";")[0])
    results = {
        name: (wait_done(cluster, job_id), root / name, (root / f"{name}.out").read_text())
        for name, job_id in ids.items()
    }
    print(f"\n=== three 2-node jobs of slurm/gpt_neox.sh, all ended {time.monotonic() - start:.1f} s after submission")
    for name, (job, _, log) in results.items():
        print(f"\n--- {name}: job {job['JobId']}, ended {job['EndTime']}, {job['JobState']}\n{excerpt(log)}")
    return results


def test_scripts_pass_shellcheck_and_ask_for_what_a_preemptible_multinode_run_needs():
    subprocess.run(["shellcheck", *map(str, SCRIPTS)], check=True)
    for script in SCRIPTS:
        opts = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), re.M))
        assert set(opts) >= {
            "nodes",
            "ntasks-per-node",
            "gpus-per-node",
            "cpus-per-task",
            "time",
            "signal",
            "requeue",
            "open-mode",
            "output",
        }, script
        assert opts["ntasks-per-node"] == opts["gpus-per-node"] == "8"  # one rank per GPU
        assert opts["signal"] == "USR1@300" and opts["open-mode"] == "append" and "%j" in opts["output"]
        assert "ssh" not in script.read_text().split("#SBATCH")[-1]  # the body starts ranks with srun only


def test_slurm_expands_a_nodelist_for_the_master(cluster, monkeypatch):
    from lora_ds.dist import slurm_hostnames

    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # scontrol finds the cluster through it
    assert slurm_hostnames("gpu[07-09],login1") == ["gpu07", "gpu08", "gpu09", "login1"]


@pytest.mark.parametrize(
    "shape, nodes, local_ranks",
    [
        (["--nodes=2", "--ntasks-per-node=1"], ["n1", "n2"], [0, 0]),
        (["--nodes=1", "--ntasks-per-node=2"], ["n1", "n1"], [0, 1]),
    ],
)
def test_srun_tasks_find_their_ranks_and_the_master_from_slurm(cluster, shape, nodes, local_ranks, tmp_path):
    cluster.run(
        [
            "srun",
            *shape,
            "--cpus-per-task=1",
            sys.executable,
            str(PROGRAMS / "rank_probe.py"),
            "--out",
            str(tmp_path),
            "--slurm",
        ],
        cwd=REPO,
        timeout=120,
    )
    tasks = read_reports(tmp_path, "discover", 2)
    job = tasks[0]["job"]
    assert [t["rank"] for t in tasks] == [0, 1]
    assert [t["node"] for t in tasks] == nodes
    assert [t["local_rank"] for t in tasks] == local_ranks
    for t in tasks:
        assert (t["world_size"], t["source"], t["master_addr"]) == (2, "slurm", "n1")
        assert t["master_port"] == 20000 + job % 20000


@pytest.mark.distributed
def test_gpt_neox_script_trains_on_two_nodes(jobs):
    job, run, log = jobs["whole"]
    assert (job["JobState"], job["ExitCode"], job["Restarts"], job["NumNodes"]) == ("COMPLETED", "0:0", "0", "2")
    assert re.search(rf"job {job['JobId']} attempt 1: 2 nodes x 1 ranks, master n1:{20000 + int(job['JobId'])}", log)
    assert f"OUTPUT={run} " in log and "adapter written to" in log
    resolved = json.loads((run / "run_config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["rank_source"], resolved["total_steps"]) == (2, "slurm", STEPS)
    assert resolved["ds_config"]["train_batch_size"] == 4 * 2 * 2
    assert metric_steps(run) == list(range(1, STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    b = [v for k, v in adapter_tensors(run / "adapter").items() if "lora_B" in k]
    assert len(b) == 2 and min(v.abs().max().item() for v in b) > 1e-3  # trained: B starts at 0


@pytest.mark.distributed
@pytest.mark.parametrize("stop", STOPS)
def test_stopped_job_checkpoints_requeues_and_resumes_to_the_uninterrupted_adapter(jobs, stop):
    """Signalled mid-run, every rank finishes its step and a checkpoint is saved; the job is requeued, resumes
    at the step after the last completed one, and ends with the uninterrupted run's adapter, bit for bit."""
    job, run, log = jobs[stop]
    _, signal, requeued_by_script = STOPS[stop]
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1")
    assert "attempt 1:" in log and "attempt 2:" in log
    assert f"stopped after a checkpoint ({signal})" in log
    # A rank still exiting when srun sees the first 124 may be killed by --kill-on-bad-exit: the batch script
    # reads the stop from the file rank 0 writes before the final barrier, not from srun's status.
    assert log.count("Exited with exit code 124") >= 1
    assert (f"job {job['JobId']}: stopped after checkpoint step_" in log) == requeued_by_script
    assert not list(REPO.glob(f".lora-ds-{job['JobId']}.stopped"))
    tag_step, stopped_at = map(int, re.search(r"resumed from \S+/step_(\d+) at step (\d+)", log).groups())
    assert tag_step == stopped_at and 2 <= stopped_at < STEPS
    assert metric_steps(run) == list(range(1, STEPS + 1))  # no step lost, none done twice
    assert_equal_tensors(adapter_tensors(run / "adapter"), adapter_tensors(jobs["whole"][1] / "adapter"))


def rank_process(job_id: int, rank: int) -> psutil.Process | None:
    """Rank `rank`'s trainer process of a Slurm job (the test cluster's nodes share this host)."""
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if (
                env.get("SLURM_JOB_ID") == str(job_id)
                and env.get("SLURM_PROCID") == str(rank)
                and "launcher/train.py" in " ".join(proc.cmdline())
            ):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


@pytest.mark.distributed
def test_a_rank_killed_by_sigkill_fails_the_job_and_resubmitting_resumes_to_the_uninterrupted_adapter(
    cluster, jobs, neox_dir, tmp_path
):
    """kill -9 is no preemption notice: nothing is saved, srun (--kill-on-bad-exit) ends the other rank, the job
    fails and is not requeued. Resubmitting the same script resumes from the last complete checkpoint."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(cluster, neox_dir, run)
    job_id = submit(cluster, [*CPU_NODES, str(SCRIPTS[0])], env, log)
    deadline = time.monotonic() + 600
    while len(metric_steps(run, running=True)) < 11:
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, (
            log.read_text() if log.exists() else "",
            cluster.logs(),
        )
        time.sleep(0.05)
    victim = rank_process(job_id, 1)
    assert victim is not None, cluster.logs()
    victim.kill()
    killed = wait_done(cluster, job_id)
    text = log.read_text()
    assert (killed["JobState"], killed["Restarts"]) == ("FAILED", "0") and killed["ExitCode"] != "0:0", (
        killed,
        excerpt(text),
    )
    assert "requeued" not in text and not (run / "adapter").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000010"

    again = submit(cluster, [*CPU_NODES, str(SCRIPTS[0])], env, tmp_path / "again.out")
    job = wait_done(cluster, again)
    text = (tmp_path / "again.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), excerpt(text)
    assert re.search(r"resumed from \S+/step_00000010 at step 10", text)
    assert metric_steps(run) == list(range(1, STEPS + 1))
    assert_equal_tensors(adapter_tensors(run / "adapter"), adapter_tensors(jobs["whole"][1] / "adapter"))
    print(
        f"\n--- kill -9 of rank 1 after step 11: job {job_id} {killed['JobState']}, exit {killed['ExitCode']}\n"
        f"{excerpt(log.read_text())}\n--- resubmitted: job {again} {job['JobState']}\n{excerpt(text)}"
    )
