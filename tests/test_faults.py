"""Faults a long run meets: a rank killed at any step or in the middle of a save, non-finite gradients."""

from __future__ import annotations

import math
import os
import random
import time

import pytest
from fixtures import Payload, save_tiny
from helpers import (
    DEMO_TOKENIZER,
    adapter_tensors,
    as_tensorboard,
    assert_equal_tensors,
    fault_env,
    launch,
    rank_pid,
    read_metrics,
    start,
    stop_group,
    tensorboard_scalars,
    train_args,
)
from safetensors.torch import load_file, save_file

from lora_ds.consolidate import export_adapter

pytestmark = pytest.mark.distributed

STEPS = 24


def run_args(model_dir, out) -> list[str]:
    return train_args(
        model_dir,
        out,
        max_steps=STEPS,
        save_every=2,
        log_every=1,
        lora_dropout=0.1,
        micro_batch=2,
        seed=3,
        keep_checkpoints=100,
        report_to="tensorboard",
    )


def losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run)]


@pytest.fixture(scope="module")
def uninterrupted(neox_dir, tmp_path_factory):
    """The run every interrupted one must reproduce: all its checkpoints kept."""
    out = tmp_path_factory.mktemp("uninterrupted")
    launch(run_args(neox_dir, out))
    return out


def last_logged_step(run) -> int:
    records = read_metrics(run, running=True)
    return records[-1]["step"] if records else 0


def assert_resumes_to_the_uninterrupted_adapter(neox_dir, run, uninterrupted, from_step: int) -> str:
    """Rerun the same command: it resumes at `from_step` and ends where the uninterrupted run ended, bit for bit.
    TensorBoard holds what metrics.jsonl holds: every step once, none of the killed run's past its checkpoint."""
    resumed = launch(run_args(neox_dir, run))
    assert f"at step {from_step}" in resumed.stdout, resumed.stdout[-3000:]
    assert_equal_tensors(adapter_tensors(run / "adapter"), adapter_tensors(uninterrupted / "adapter"))
    assert losses(run) == losses(uninterrupted)
    assert tensorboard_scalars(run) == as_tensorboard(read_metrics(run))
    tags = sorted(os.listdir(run / "checkpoints"))
    assert tags == sorted(os.listdir(uninterrupted / "checkpoints"))
    return resumed.stderr


def test_kill_9_of_one_rank_at_a_random_step_loses_nothing(neox_dir, uninterrupted, tmp_path):
    seed = int(os.environ.get("LORA_DS_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    kill_at, victim_rank = rng.randint(3, STEPS - 6), rng.randint(0, 1)
    why = f"LORA_DS_TEST_SEED={seed}: kill rank {victim_rank} once step {kill_at} is logged"
    run = tmp_path / "run"
    log = tmp_path / "killed.log"
    proc = start(run_args(neox_dir, run), log=log)  # a file, not a pipe: nobody reads while the run goes on
    try:
        deadline = time.monotonic() + 600
        while last_logged_step(run) < kill_at:
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"{why}: the run ended first\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.005)
        victim = rank_pid(proc, victim_rank)
        assert victim is not None, why
        os.kill(victim, 9)
        proc.wait(timeout=300)
    finally:
        stop_group(proc)
    output = log.read_text()
    killed_after = last_logged_step(run)
    assert proc.returncode != 0, f"{why}\n{output[-3000:]}"
    assert killed_after < STEPS and not (run / "adapter").exists(), why

    # The newest complete checkpoint is intact: it exports to the uninterrupted run's adapter at that step.
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = int(tag[len("step_") :])
    assert 2 <= step <= killed_after, why
    export_adapter(str(run / "checkpoints"), str(tmp_path / "at_kill"))
    export_adapter(str(uninterrupted / "checkpoints"), str(tmp_path / "reference"), tag=tag)
    assert_equal_tensors(adapter_tensors(tmp_path / "at_kill"), adapter_tensors(tmp_path / "reference"))

    assert_resumes_to_the_uninterrupted_adapter(neox_dir, run, uninterrupted, step)
    print(
        f"{why}: killed after step {killed_after} was logged; launcher exit {proc.returncode}; "
        f"resumed from {tag}; final adapter == uninterrupted"
    )


KILL_POINTS = {
    # rank 1 dies with half of its optimizer shard on disk; rank 0 waits in the barrier and is taken down
    "rank 1 mid-write of its optimizer shard": "1:step_00000004:zero_pp_rank_1_mp_rank_00_optim_states.pt",
    # every rank's files are complete, but the tag is never sealed
    "rank 0 before sealing the tag": "0:step_00000004:trainer_state.json",
    # the tag is sealed, but `latest` still names the previous one
    "rank 0 before naming the tag latest": "0:step_00000004:latest",
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_a_kill_during_a_save_keeps_the_previous_checkpoint_and_latest(neox_dir, uninterrupted, tmp_path, point):
    run = tmp_path / "run"
    killed = launch(run_args(neox_dir, run), check=False, env=fault_env(KILL_POINTS[point]))
    assert killed.returncode != 0, killed.stderr[-3000:]
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (ckpt / "step_00000004").is_dir() and not (run / "adapter").exists()
    export_adapter(str(ckpt), str(tmp_path / "latest"))
    export_adapter(str(uninterrupted / "checkpoints"), str(tmp_path / "reference"), tag="step_00000002")
    assert_equal_tensors(adapter_tensors(tmp_path / "latest"), adapter_tensors(tmp_path / "reference"))

    stderr = assert_resumes_to_the_uninterrupted_adapter(neox_dir, run, uninterrupted, 2)
    assert "ignoring step_00000004, newer than 'latest' (step_00000002)" in stderr
    leftovers = [p for p in ckpt.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory):
    """A tiny GPT-NeoX whose EOS embedding is Inf: every example ends with EOS, so every step's gradient is NaN."""
    out = save_tiny("gpt_neox", 512, tmp_path_factory.mktemp("poisoned"), tokenizer=DEMO_TOKENIZER)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        if "gpt_neox.embed_in.weight" in tensors:
            tensors["gpt_neox.embed_in.weight"][0] = float("inf")
            save_file(tensors, shard, metadata={"format": "pt"})
    return out


def test_nonfinite_steps_are_skipped_then_the_run_stops_at_its_last_checkpoint(poisoned_dir, tmp_path):
    proc = launch(
        train_args(poisoned_dir, tmp_path, max_steps=8, save_every=2, max_skipped_steps=3, micro_batch=2), check=False
    )
    assert proc.returncode == 3
    assert "more than 3 steps had NaN/Inf gradients (--max_skipped_steps)" in proc.stderr
    assert "last good checkpoint is" in proc.stderr and "step_00000002" in proc.stderr
    assert [r["skipped_steps"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["grad_norm"] for r in read_metrics(tmp_path)] == [math.inf] * 3  # DeepSpeed's norm of a skipped step
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / "adapter").exists()


def test_resume_refuses_a_checkpoint_file_carrying_a_payload(neox_dir, tmp_path):
    import torch

    args = train_args(neox_dir, tmp_path / "run", max_steps=4, micro_batch=2)
    launch([*args, "--halt_at_step", "2"])
    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": Payload(marker)}, tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    proc = launch(args, check=False)
    assert proc.returncode != 0 and not marker.exists()
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: refused to unpickle" in proc.stderr
    assert not (tmp_path / "run" / "adapter").exists()
