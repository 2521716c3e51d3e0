"""Elastic resume: a checkpoint written by 2 ranks resumes on 1 and on 3 ranks with the same optimizer state."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import adapter_tensors, assert_close_tensors, launch, metric_steps, reference_lora, train_args

pytestmark = pytest.mark.distributed

# Global batch 12 on every world size: micro 2 × accum (12 / (2 × world)).
ACCUM = {1: 6, 2: 3, 3: 2}
BASE = dict(micro_batch=2, lora_r=4, lora_alpha=8, lr=1e-2, warmup=1, seed=3, max_len=128, max_steps=3)


def reference_step(model_dir, tag_dir, world: int, step: int = 2) -> dict:
    """One plain-PyTorch AdamW step from the consolidated state of `tag_dir`, with `world` ranks' batches."""
    from transformers import AutoModelForCausalLM

    from lora_ds.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return reference_lora(
        model,
        load_tokenizer(str(model_dir)),
        ["query_key_value"],
        steps=range(step, step + 1),
        world=world,
        micro=2,
        accum=ACCUM[world],
        seed=3,
        tag_dir=tag_dir,
    )


@pytest.fixture(scope="module")
def two_rank_checkpoint(neox_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    launch(train_args(neox_dir, out, grad_accum=ACCUM[2], halt_at_step=2, **BASE))
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_two_rank_checkpoint_resumes_on_another_world_size(neox_dir, two_rank_checkpoint, tmp_path, world):
    run = tmp_path / "run"
    shutil.copytree(two_rank_checkpoint, run)
    proc = launch(train_args(neox_dir, run, grad_accum=ACCUM[world], **BASE), nproc=world)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "written by 2 ranks, resumed on" in proc.stderr
    ref = reference_step(neox_dir, two_rank_checkpoint / "checkpoints" / "step_00000002", world)
    assert_close_tensors(adapter_tensors(run / "adapter"), ref, rtol=1e-4, atol=3e-5)
    assert metric_steps(run) == [1, 2, 3]
