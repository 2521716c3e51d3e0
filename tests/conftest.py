"""Shared fixtures: tiny HF model dirs (random weights) and a launcher for real multi-rank runs."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tokenizers_util import train_sentencepiece_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "launcher" / "demo"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run launcher/train.py with the real `deepspeed` launcher on `nproc` CPU ranks (gloo)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [str(DEEPSPEED), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / "launcher" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(args)}\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


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
