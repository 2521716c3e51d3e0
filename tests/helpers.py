"""The one test harness: the CPU-rank environment, launching ranks, reading what runs wrote, tiny-run arguments.

    launch(train_args(neox_dir, out, max_steps=4))            # launcher/train.py on 2 CPU ranks, to its end
    proc = start(train_args(...), log=path) ... stop_group(proc)  # a run to watch (poll metrics, kill a rank)
    launch(["eval", ...], program="lora_ds")                   # `lora-ds eval` on 2 ranks (deepspeed --module)
    launch(flags, nproc=1, program=PROGRAMS / "preset_base.py")  # a rank program of tests/programs/
    read_metrics(out), metric_steps(out), adapter_tensors(out / "adapter"), read_reports(out, "probe", 2)
    tensorboard_scalars(out) == as_tensorboard(read_metrics(out))   # OUTPUT/tensorboard/ holds metrics.jsonl

Every process a test starts gets `cpu_env()`: DeepSpeed's CPU accelerator (gloo), one OpenMP thread per rank
(the ranks share the machine's cores), unbuffered output, no tokenizer threads, and none of the rank variables
of the process that runs pytest. A test that starts DeepSpeed ranks is marked `distributed`, one that needs
Slurm or Open MPI `cluster`: `make test-fast` leaves both out, and the launchers here refuse to run in a test
without its mark, so the fast set never starts a rank.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "launcher" / "demo"
TRAIN_DATA = DEMO / "train.jsonl"
EVAL_DATA = DEMO / "eval.jsonl"
DEMO_TOKENIZER = DEMO / "tokenizer"
TRAINER = REPO / "launcher" / "train.py"
PROGRAMS = REPO / "tests" / "programs"
ZERO3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
PEFT_PREFIX = "base_model.model."

# ---- the environment of every process a test starts --------------------------------------------------------

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cpu_env(**extra) -> dict:
    """This process's environment for a CPU rank (or a command that starts ranks), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    return {**env, **CPU_ENV, **{k: str(v) for k, v in extra.items()}}


def fault_env(kill_during: str) -> dict:
    """Variables that load tests/programs/faults/sitecustomize.py into every rank: LORA_DS_KILL_DURING is
    "<rank>:<tag>:<file name>" (that file's docstring says what happens)."""
    path = os.pathsep.join(p for p in (str(PROGRAMS / "faults"), os.environ.get("PYTHONPATH", "")) if p)
    return {"LORA_DS_KILL_DURING": kill_during, "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_shm_buffers(port: int) -> list[str]:
    """DeepSpeed's CPU all-reduce maps a /dev/shm buffer per rank (66 MB) named after the master port and never
    unlinks it; the trainer unlinks its own after init. A run killed before that leaves them: left there, a test
    session's runs fill the machine's memory. Returns the names it removed."""
    paths = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for path in paths:
        path.unlink(missing_ok=True)
    return [p.name for p in paths]


# ---- tiny-run arguments ------------------------------------------------------------------------------------


def flags(**values) -> list[str]:
    """`--name value` for each value (`--name` alone for True; None leaves the flag out)."""
    argv = []
    for name, value in values.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def eval_tiny_wikisql(wikisql_file, out, **source) -> int:
    """`lora-ds eval` in this process of preset:tiny-gpt-neox on `wikisql_file` with `source` (adapter= or
    checkpoint=), into `out`: its exit status."""
    from lora_ds.cli import main

    args = flags(model="preset:tiny-gpt-neox", task="wikisql", data=str(wikisql_file), out=str(out), **source)
    return main(["eval", *args])


def train_args(model, output_dir, **values) -> list[str]:
    """launcher/train.py's flags for a tiny CPU run of `model` into `output_dir`: the demo's training data, no eval
    data and fp32 unless `values` say otherwise (each value as in `flags`)."""
    return flags(
        **{"model": model, "output_dir": output_dir, "data": TRAIN_DATA, "eval_data": "", "dtype": "fp32", **values}
    )


def ds_config_file(path: Path, **overrides) -> str:
    """ds_configs/zero3.json with top-level `overrides`, written to `path`; returns the path."""
    Path(path).write_text(json.dumps(ZERO3 | overrides))
    return str(path)


# ---- launching ---------------------------------------------------------------------------------------------

RUNNING_MARKS: set[str] | None = None  # marks of the test being set up or run (set by conftest.py)


def require_mark(mark: str) -> None:
    """Refuse to start ranks in a test that is not marked `mark`: `make test-fast` selects by these marks."""
    if RUNNING_MARKS is not None and mark not in RUNNING_MARKS:
        raise AssertionError(
            f"this test starts ranks: mark it @pytest.mark.{mark} so that `make test-fast` leaves it out"
        )


def deepspeed_command(
    args: list[str], nproc: int | None, port: int, program: Path | str = TRAINER, launcher_args: tuple = ()
) -> list[str]:
    """The `deepspeed` launcher line that runs `program` (a script, or a module name: `--module`) on `nproc`
    local CPU ranks (None: `launcher_args` say where the ranks are)."""
    ranks = ["--num_gpus", str(nproc)] if nproc else []
    target = [str(program)] if isinstance(program, Path) else ["--no_local_rank", "--module", program]
    return [str(DEEPSPEED), *ranks, *map(str, launcher_args), "--master_port", str(port), *target, *map(str, args)]


def start(
    args: list[str],
    nproc: int | None = 2,
    *,
    program: Path | str = TRAINER,
    env: dict | None = None,
    port: int | None = None,
    launcher_args: tuple = (),
    log: Path | None = None,
) -> subprocess.Popen:
    """Start `program` (launcher/train.py unless given) with the real `deepspeed` launcher on `nproc` CPU ranks
    (gloo), in its own process group, so that `stop_group` ends the launcher and every rank at once. Output goes
    to `log` (stdout and stderr together) when given, else to pipes that `finish` reads."""
    require_mark("distributed")
    port = port or free_port()
    cmd = deepspeed_command(args, nproc, port, program, launcher_args)
    if log is None:
        out, err = subprocess.PIPE, subprocess.PIPE
    else:
        out, err = open(log, "w"), subprocess.STDOUT
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cpu_env(**(env or {})), text=True, start_new_session=True, stdout=out, stderr=err
    )
    if log is not None:
        out.close()
    proc.master_port = port
    return proc


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher started by `start` and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    free_shm_buffers(proc.master_port)


def finish(proc: subprocess.Popen, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Wait for a launch to end; its output, and `.shm_leftovers` (the buffers `free_shm_buffers` had to remove).
    A launch past `timeout`, or (with `check`) one that failed, fails the test with its output's tail."""
    command = " ".join(proc.args[proc.args.index("--master_port") + 2 :])
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {command}\n{tail(stdout)}\n{tail(stderr)}") from None
    leftovers = free_shm_buffers(proc.master_port)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit status {proc.returncode}: {command}\n{tail(stdout)}\n{tail(stderr)}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done.shm_leftovers = leftovers
    return done


def tail(text: str | None, chars: int = 6000) -> str:
    return (text or "")[-chars:]


def launch(
    args: list[str], nproc: int = 2, *, check: bool = True, timeout: float = 900, **start_kw
) -> subprocess.CompletedProcess:
    """`start` then `finish`: a run to its end."""
    return finish(start(args, nproc, **start_kw), timeout, check)


def launch_together(*runs: dict) -> list[subprocess.CompletedProcess]:
    """`launch(**run)` of every run at once: runs that wait on each other's start-up and gloo share the cores
    better together than one after the other. Raises the first failure once all have ended."""
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(launch, **run) for run in runs]
        concurrent.futures.wait(futures)
    return [f.result() for f in futures]


def rank_pid(launcher: subprocess.Popen, rank: int, script: str = "launcher/train.py") -> int | None:
    """The pid of rank `rank` of a `start`ed run, once it runs `script`."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if script in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


def mpirun(args: list[str], np: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """Open MPI's `mpirun` (as root) of `args` on `np` local ranks; fails the test unless it succeeds."""
    require_mark("cluster")
    cmd = [shutil.which("mpirun"), "--allow-run-as-root", "-np", str(np), "--bind-to", "none", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, tail(proc.stdout, 4000) + tail(proc.stderr, 4000)
    return proc


def run_cli(
    *args, module: str = "lora_ds", timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (the `lora-ds` command unless given) in a fresh process, from the repository,
    reading `stdin` (text piped in) when given."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=cpu_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fork_trainer(argv: list[str], log: Path, timeout: float = 600) -> tuple[int, str]:
    """launcher/train.py's cli(argv) in a forked process, in the CPU-rank environment: (exit status, output).
    The imports are shared, so a run that stops at bad input takes a fraction of a second; one that hangs is
    killed and fails the test with its output. Only for runs that stop before training: a fork of a pytest
    whose earlier tests started torch's OpenMP threads can deadlock at a step's first parallel op."""
    from launcher import train

    pid = os.fork()
    if pid == 0:
        os.environ.update(CPU_ENV)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # pytest replaced sys.std*
        code = 1
        try:
            code = train.cli(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the trainer still ran after {timeout} s: {argv}\n{tail(log.read_text(), 3000)}")
        time.sleep(0.1)
    return os.waitstatus_to_exitcode(done[1]), log.read_text()


# ---- reading what runs wrote -------------------------------------------------------------------------------


def read_metrics(run: Path, running: bool = False) -> list[dict]:
    """The records of RUN/metrics.jsonl. `running`: the run may still write it (none yet, or a last line cut
    short, reads as the records before it)."""
    path = Path(run) / "metrics.jsonl"
    if running and not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if running and lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


def metric_steps(run: Path, running: bool = False) -> list[int]:
    return [r["step"] for r in read_metrics(run, running)]


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of RUN/tensorboard/'s event files, read by TensorBoard's own reader (which
    hides the events that a resumed run's writer purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run) / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep them all
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_tensorboard(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl records as TensorBoard should hold them: each number as a float32 scalar at the record's
    step, tagged `eval/X` for `eval_X` and `train/X` for the others (Hugging Face Trainer's tags)."""
    import numpy as np

    scalars = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and type(value) in (int, float):
                tag = "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key
                scalars.setdefault(tag, []).append((r["step"], np.float32(value).item()))
    return scalars


def wandb_runs(run: Path, count: int, timeout: float = 60) -> list[dict]:
    """The `count` offline W&B runs under RUN/wandb/, oldest first, as {"id", "config", "history": [(step, {tag:
    value})]}, once each is complete: W&B's service process may still be writing a run when `finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _read_wandb_runs(run)
        if len(runs) == count and all(r["complete"] for r in runs):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"{run}/wandb: {len(runs)} runs, complete: {[r['complete'] for r in runs]}")
        time.sleep(0.2)


def _read_wandb_runs(run: Path) -> list[dict]:
    """Each run's .wandb file, read as it is: W&B's record log (LevelDB's format: 32 KiB blocks of checksummed
    chunks after a 7-byte header) of its own protobuf Records; complete once its exit record is there."""
    import struct

    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(Path(run, "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending, chunks = path.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:  # a block's zero-padded tail
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending += chunk
            if kind in (1, 4):  # a whole record, or the last chunk of one
                chunks.append(pending)
                pending = b""
        found = {"id": None, "config": {}, "history": [], "complete": False}
        for raw in chunks:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["id"] = record.run.run_id
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
                found["config"] = {k: v for k, v in config.items() if not k.startswith("_")}
            elif kind == "history":
                # A tag with a slash is stored as its parts.
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                items = {k: v for k, v in items.items() if not k.startswith("_")}  # W&B's own _step, _runtime
                found["history"].append((record.history.step.num, items))
            elif kind == "exit":
                found["complete"] = True
        runs.append(found)
    return runs


def adapter_tensors(adapter_dir: Path) -> dict:
    """{module param name: tensor} of an adapter dir's weights, read by safetensors alone (no lora_ds reader)."""
    from safetensors.torch import load_file

    return {
        k.removeprefix(PEFT_PREFIX): v for k, v in load_file(Path(adapter_dir) / "adapter_model.safetensors").items()
    }


def read_reports(directory: Path, stem: str, world: int) -> list[dict]:
    """The `<stem>_rank<r>.json` report of each rank of a rank program."""
    return [json.loads((Path(directory) / f"{stem}_rank{rank}.json").read_text()) for rank in range(world)]


def assert_equal_tensors(ours: dict, expected: dict) -> None:
    """The same names, and every tensor equal bit for bit."""
    import torch

    assert sorted(ours) == sorted(expected)
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def assert_close_tensors(ours: dict, expected: dict, rtol: float, atol: float) -> None:
    import torch

    assert sorted(ours) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=rtol, atol=atol, msg=name)


# ---- the plain-PyTorch reference of the trainer ------------------------------------------------------------


def reference_lora(
    model,
    tok,
    targets,
    *,
    steps: range,
    world: int,
    micro: int,
    accum: int,
    seed: int,
    lr: float = 1e-2,
    warmup: int = 0,
    r: int = 4,
    alpha: float = 8,
    data: Path = TRAIN_DATA,
    max_len: int = 128,
    tag_dir: Path | None = None,
    grad_norms: list | None = None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    loraplus_lr_ratio: float | None = None,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
    init_lora_weights: str = "default",
) -> dict:
    """The LoRA of `model` after the trainer's steps `steps` on `world` ranks, in one process with plain PyTorch
    (no DeepSpeed): the same rows per step and rank (StepSampler), loss scaling, clipping at 1.0, AdamW (weight
    decay 0.1) and warm-up/decay schedule over `steps.stop` steps. It starts from `tag_dir`'s consolidated state
    (fp32 params, Adam moments and step, scheduler) when given, else from the LoRA init of `seed`. `grad_norms`,
    when given, gets each step's gradient norm before clipping. `rank_pattern` / `alpha_pattern`: PEFT's, and
    `loraplus_lr_ratio`: LoRA+ as PEFT's create_loraplus_optimizer groups it (B, and DoRA's magnitudes, at
    lr × ratio). `use_dora`: the model is PEFT's own DoRA (the oracle), started from our initial factors.
    `modules_to_save`: those modules trained in full too (their loss through the model's own full logits).
    `init_lora_weights`: inject_lora's (PiSSA/OLoRA: `model` becomes the residual base)."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from lora_ds.checkpoint_files import read_model_states, read_zero3_state
    from lora_ds.data import StepSampler, collate, load_rows
    from lora_ds.engine import WarmupLinear
    from lora_ds.lora import inject_lora, lora_parameters
    from lora_ds.loss import lm_loss

    rows = load_rows(str(data), tok, max_len)
    if use_dora:
        model, params = peft_dora(model, targets, r, alpha, seed)
    else:
        adapted = inject_lora(
            model,
            targets,
            r,
            alpha,
            0.0,
            seed=seed,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            init_lora_weights=init_lora_weights,
        )
        params = lora_parameters(model)
        if modules_to_save:
            from lora_ds.saved_modules import select, unfreeze

            params.update(unfreeze(model, select(model, modules_to_save, adapted)))
    groups = [{"params": list(params.values()), "lr": lr}]
    if loraplus_lr_ratio is not None:
        groups = [
            {"params": [p for n, p in params.items() if "lora_A" in n], "lr": lr},
            {"params": [p for n, p in params.items() if "lora_A" not in n], "lr": lr * loraplus_lr_ratio},
        ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)
    sched = LambdaLR(opt, WarmupLinear(warmup, steps.stop))
    if tag_dir is not None:
        saved, _, adam_step = read_zero3_state(str(tag_dir), moments=True)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name]["fp32"])
                opt.state[p] = {
                    "step": adam_step.clone(),
                    "exp_avg": saved[name]["exp_avg"].clone(),
                    "exp_avg_sq": saved[name]["exp_avg_sq"].clone(),
                }
        sched.load_state_dict(read_model_states(str(tag_dir))["lr_scheduler"])
        for group, group_lr in zip(opt.param_groups, sched.get_last_lr()):
            group["lr"] = group_lr
    sampler = StepSampler(len(rows), micro, accum, world, seed)
    for step in steps:
        opt.zero_grad()
        for rank in range(world):
            for indices in sampler.micro_batches(step, rank):
                loss, _ = lm_loss(model, collate([rows[i] for i in indices], tok.pad_token_id))
                (loss / (accum * world)).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        if grad_norms is not None:
            grad_norms.append(norm.item())
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in params.items()}


def tiny_adapter_config(targets, base_model, **fields) -> dict:
    """The adapter_config.json of the tests' hand-made adapters: r 4, alpha 8, no dropout or rsLoRA; `fields`:
    more peft_config arguments."""
    from lora_ds.adapter import peft_config

    defaults = dict(r=4, alpha=8, dropout=0.0, use_rslora=False, fan_in_fan_out=False)
    return peft_config(**(defaults | fields), target_modules=targets, base_model=str(base_model))


def peft_trainable(peft_model) -> dict:
    """{our name (lora_ds.lora.lora_parameters'): Parameter} of a PEFT model's trainable LoRA tensors."""
    return {
        name.removeprefix(PEFT_PREFIX)
        .replace(".default", "")
        .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    }


def peft_dora(model, targets, r: int, alpha: float, seed: int):
    """(PEFT's DoRA model of `model`, {our param name: its Parameter}), its lora_A set to what our `inject_lora`
    draws with `seed` (its B is zero and its magnitude ||W0|| per row, as ours)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from lora_ds.lora import inject_lora, lora_parameters

    ours = copy.deepcopy(model)
    inject_lora(ours, targets, r, alpha, 0.0, seed=seed, use_dora=True)
    initial = lora_parameters(ours)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), use_dora=True)
    peft_model = get_peft_model(model, config)
    params = peft_trainable(peft_model)
    assert sorted(params) == sorted(initial)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("lora_A.weight"):
                p.copy_(initial[name])
    return peft_model, params
