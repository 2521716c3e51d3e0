"""Faults a long run meets: non-finite gradients."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import DEMO, launch, save_tiny

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory):
    """A tiny GPT-NeoX whose EOS embedding is Inf: every example ends with EOS, so every step's gradient is NaN."""
    out = tmp_path_factory.mktemp("poisoned")
    save_tiny("gpt_neox", 512, out)
    for f in (DEMO / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        if "gpt_neox.embed_in.weight" in tensors:
            tensors["gpt_neox.embed_in.weight"][0] = float("inf")
            save_file(tensors, shard, metadata={"format": "pt"})
    return out


def test_nonfinite_steps_are_skipped_then_the_run_stops_at_its_last_checkpoint(poisoned_dir, tmp_path):
    proc = launch(["--model", str(poisoned_dir), "--output_dir", str(tmp_path), "--max_steps", "8",
                   "--save_every", "2", "--max_skipped_steps", "3", "--dtype", "fp32", "--micro_batch", "2",
                   "--data", str(DEMO / "train.jsonl"), "--eval_data", ""], check=False)
    assert proc.returncode == 3
    assert "more than 3 steps had NaN/Inf gradients (--max_skipped_steps)" in proc.stderr
    assert "last good checkpoint is" in proc.stderr and "step_00000002" in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / "adapter").exists()


def test_resume_refuses_a_checkpoint_file_carrying_a_payload(neox_dir, tmp_path):
    import torch

    from test_checkpoint_files import Payload

    args = ["--model", str(neox_dir), "--output_dir", str(tmp_path / "run"), "--max_steps", "4", "--dtype", "fp32",
            "--micro_batch", "2", "--data", str(DEMO / "train.jsonl"), "--eval_data", ""]
    launch([*args, "--halt_at_step", "2"])
    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": Payload(marker)}, tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    proc = launch(args, check=False)
    assert proc.returncode != 0 and not marker.exists()
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: refused to unpickle" in proc.stderr
    assert not (tmp_path / "run" / "adapter").exists()
