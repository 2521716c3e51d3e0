"""pytest's side of the harness: session hygiene, the marks the launchers check, and the shared fixtures
(tiny model dirs and the WikiSQL eval file). What they are built from lives in helpers.py and fixtures.py."""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest
from fixtures import demo_texts, save_tiny, train_sentencepiece_model, write_wikisql

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
