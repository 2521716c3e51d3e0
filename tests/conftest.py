"""pytest's side of the harness: session hygiene, the marks the launchers check, and the shared fixtures
(tiny model dirs, a random adapter, and the WikiSQL eval file). What they are built from lives in helpers.py and
fixtures.py."""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest
from fixtures import demo_texts, save_model_dir, save_tiny, train_sentencepiece_model, write_wikisql

from lora_ds.dist import stale_build_locks


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up: the launchers in helpers.py check the test's marks."""
    helpers.RUNNING_MARKS = {mark.name for mark in item.iter_markers()}


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


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory) -> Path:
    """Tiny GPT-NeoX dir with the demo's HF tokenizer."""
    return save_tiny("gpt_neox", 512, tmp_path_factory.mktemp("neox"), tokenizer=helpers.DEMO_TOKENIZER)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny Llama dir whose only tokenizer file is a SentencePiece tokenizer.model (as many Llama repos)."""
    out = tmp_path_factory.mktemp("llama")
    train_sentencepiece_model(demo_texts(), out / "tokenizer.model")
    return save_tiny("llama", 448, out)


@pytest.fixture(scope="session")
def wikisql_file(tmp_path_factory) -> Path:
    """fixtures.WIKISQL's five questions in the original release's layout (dev.jsonl + dev.tables.jsonl)."""
    return write_wikisql(tmp_path_factory.mktemp("wikisql"))


EOS_LIKE = 102  # a token the tiny random model often generates


@pytest.fixture(scope="session")
def base_dir(neox_dir, tmp_path_factory) -> Path:
    """The tiny GPT-NeoX with EOS's output row made 1.05 × that of a token it often generates, so that
    generations end at different lengths (as a trained model's do) and ranks finish at different steps."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[0] = head[EOS_LIKE] * 1.05  # id 0 is the demo tokenizer's EOS
    return save_model_dir(model, tmp_path_factory.mktemp("eos_neox"), tokenizer=neox_dir)


@pytest.fixture(scope="session")
def random_adapter(base_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (PEFT format) with random, non-zero A and B on the fused QKV projections: it changes the
    model a lot, and its generations still end at different lengths."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import peft_config, write_adapter
    from lora_ds.lora import inject_lora, lora_parameters

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    inject_lora(model, ["query_key_value"], 4, 8)
    gen = torch.Generator().manual_seed(1)
    tensors = {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in lora_parameters(model).items()}
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    write_adapter(
        str(out),
        tensors,
        peft_config(
            r=4,
            alpha=8,
            dropout=0.0,
            target_modules=["query_key_value"],
            use_rslora=False,
            fan_in_fan_out=False,
            base_model=str(base_dir),
        ),
    )
    return out
