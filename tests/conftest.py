"""Shared fixtures: tiny HF model dirs (random weights) and a launcher for real multi-rank runs."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ds.dist import stale_build_locks
from tokenizers_util import train_sentencepiece_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "launcher" / "demo"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


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


@pytest.fixture(autouse=True, scope="session")
def _no_stale_build_locks():
    """A build killed in an earlier session (a test timed out mid-compile) leaves its lock, which the trainer
    refuses (lora_ds.dist.check_build_locks): this machine's tests clear it as the message says."""
    for lock in stale_build_locks():
        lock.unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="session")
def _no_leaked_shm_buffers():
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)


def start(args: list[str], nproc: int = 2, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start launcher/train.py with the real `deepspeed` launcher on `nproc` CPU ranks (gloo)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **(env or {}))
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(nproc), "--master_port", str(port),
           str(REPO / "launcher" / "train.py"), *args]
    # Its own process group, so that a test can stop the launcher and every rank at once.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, start_new_session=True, **popen)
    proc.master_port = port
    return proc


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher started by `start` and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    free_shm_buffers(proc.master_port)


def launch(args: list[str], nproc: int = 2, check: bool = True, timeout: int = 900,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run launcher/train.py on `nproc` CPU ranks to the end."""
    proc = start(args, nproc, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"launch timed out after {timeout} s: {' '.join(args)}\n{stdout[-6000:]}\n"
                             f"{stderr[-6000:]}") from None
    leftovers = free_shm_buffers(proc.master_port)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(args)}\n"
                             f"{stdout[-6000:]}\n{stderr[-6000:]}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done.shm_leftovers = leftovers
    return done


def save_tiny(model_type: str, vocab_size: int, out: Path, **overrides) -> Path:
    """A tiny random-weight HF model dir, saved in several safetensors shards with an index."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ds.model import PRESETS

    kwargs = dict(PRESETS[f"tiny-{model_type.replace('_', '-')}"][1], vocab_size=vocab_size, **overrides)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="100KB")
    return out


def demo_texts() -> list[str]:
    import json

    return [json.loads(line)["prompt"] + json.loads(line)["completion"]
            for line in (DEMO / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory) -> Path:
    """Tiny GPT-NeoX dir with the demo's HF tokenizer."""
    out = tmp_path_factory.mktemp("neox")
    save_tiny("gpt_neox", 512, out)
    for f in (DEMO / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny Llama dir whose only tokenizer file is a SentencePiece tokenizer.model (as many Llama repos)."""
    out = tmp_path_factory.mktemp("llama")
    train_sentencepiece_model(demo_texts(), out / "tokenizer.model")
    save_tiny("llama", 448, out)
    return out
