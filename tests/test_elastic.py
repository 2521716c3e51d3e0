"""Elastic resume: a checkpoint written by 2 ranks resumes on 1 and on 3 ranks with the same optimizer state."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO, launch

pytestmark = pytest.mark.distributed

# Global batch 12 on every world size: micro 2 × accum (12 / (2 × world)).
ACCUM = {1: 6, 2: 3, 3: 2}
BASE = ["--data", str(DEMO / "train.jsonl"), "--eval_data", "", "--dtype", "fp32", "--micro_batch", "2",
        "--lora_r", "4", "--lora_alpha", "8", "--lr", "1e-2", "--warmup", "1", "--seed", "3", "--max_len", "128",
        "--max_steps", "3"]


def reference_step(model_dir, tag_dir, world: int, step: int = 2) -> dict:
    """One plain-PyTorch AdamW step from the consolidated state of `tag_dir`, with `world` ranks' batches."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import AutoModelForCausalLM

    from lora_ds.checkpoint_files import load_pt, read_zero3_state
    from lora_ds.data import StepSampler, collate, read_jsonl_pairs
    from lora_ds.engine import WarmupLinear
    from lora_ds.lora import inject_lora, lora_parameters
    from lora_ds.loss import lm_loss
    from lora_ds.tokenizer import load_tokenizer

    saved, _, adam_step = read_zero3_state(str(tag_dir), moments=True)
    tok = load_tokenizer(str(model_dir))
    rows = read_jsonl_pairs(str(DEMO / "train.jsonl"), tok, 128)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inject_lora(model, ["query_key_value"], 4, 8)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name]["fp32"])
            opt.state[p] = {"step": adam_step.clone(), "exp_avg": saved[name]["exp_avg"].clone(),
                            "exp_avg_sq": saved[name]["exp_avg_sq"].clone()}
    sched = LambdaLR(opt, WarmupLinear(1, 3))
    sched.load_state_dict(load_pt(str(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"))["lr_scheduler"])
    opt.param_groups[0]["lr"] = sched.get_last_lr()[0]
    sampler = StepSampler(len(rows), 2, ACCUM[world], world, seed=3)
    for rank in range(world):
        for indices in sampler.micro_batches(step, rank):
            loss, _ = lm_loss(model, collate([rows[i] for i in indices], tok.pad_token_id))
            (loss / (world * ACCUM[world])).backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    return {k: v.detach() for k, v in params.items()}


@pytest.fixture(scope="module")
def two_rank_checkpoint(neox_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    launch(["--model", str(neox_dir), "--output_dir", str(out), "--grad_accum", str(ACCUM[2]), "--halt_at_step", "2",
            *BASE])
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_two_rank_checkpoint_resumes_on_another_world_size(neox_dir, two_rank_checkpoint, tmp_path, world):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_rank_checkpoint, run)
    proc = launch(["--model", str(neox_dir), "--output_dir", str(run), "--grad_accum", str(ACCUM[world]), *BASE],
                  nproc=world)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "written by 2 ranks, resumed on" in proc.stderr
    ours = {k[len("base_model.model."):]: v for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items()}
    ref = reference_step(neox_dir, two_rank_checkpoint / "checkpoints" / "step_00000002", world)
    assert sorted(ours) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=3e-5, msg=name)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
