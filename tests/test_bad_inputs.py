"""Bad input to the trainer: each case exits non-zero with one message naming the file, field or flag, and
leaves nothing half-written in the output directory."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from helpers import ds_config_file, fork_trainer, launch, train_args


def ds_file(tmp, **overrides):
    return ds_config_file(tmp / "ds.json", **overrides)


def write(path, text):
    path.write_text(text)
    return str(path)


def model_copy(neox_dir, tmp, drop=(), truncate=None):
    out = tmp / "model"
    shutil.copytree(neox_dir, out)
    for name in drop:
        for f in out.glob(name):
            f.unlink()
    if truncate:
        shard = sorted(out.glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:truncate])
    return str(out)


def checkpoint_dir(tmp, latest, complete=False):
    ckpt = tmp / "out" / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    if complete:
        (ckpt / "step_00000002" / "trainer_state.json").write_text("{}")
    if latest is not None:
        (ckpt / "latest").write_text(latest)
    return []


# (case id, function (tmp, neox_dir) -> extra flags, expected message fragment)
CASES = [
    ("lora r = 0", lambda t, m: ["--lora_r", "0"], "--lora_r 0: the rank must be a positive integer"),
    ("lora alpha < 0", lambda t, m: ["--lora_alpha", "-4"], "--lora_alpha -4.0: alpha must be positive"),
    ("lora dropout 1", lambda t, m: ["--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
    ("unknown target module", lambda t, m: ["--lora_targets", "q_proj"], "--lora_targets ['q_proj']: matches no"),
    ("fp16 dtype", lambda t, m: ["--dtype", "fp16"], "--dtype fp16"),
    ("liger kernels without a gpu", lambda t, m: ["--kernels", "liger"], "--kernels liger: needs a CUDA device"),
    ("micro batch 0", lambda t, m: ["--micro_batch", "0"], "--micro_batch 0"),
    ("negative warmup", lambda t, m: ["--warmup", "-1"], "--warmup -1"),
    ("unknown preset", lambda t, m: ["--model", "preset:gpt-5"], "preset:gpt-5: unknown preset"),
    (
        "config unknown key",
        lambda t, m: ["--config", write(t / "c.yaml", "lora:\n  rank: 8\n")],
        "unknown key lora.rank",
    ),
    (
        "config unknown section",
        lambda t, m: ["--config", write(t / "c.yaml", "trainer:\n  lr: 1\n")],
        "unknown section 'trainer'",
    ),
    ("config not yaml", lambda t, m: ["--config", write(t / "c.yaml", "lora: [\n")], "c.yaml: cannot parse"),
    ("config missing", lambda t, m: ["--config", str(t / "none.yaml")], "--config"),
    (
        "config seed not a number",
        lambda t, m: ["--config", write(t / "c.yaml", "train:\n  seed: seven\n")],
        "--seed seven (train.seed in ",
    ),
    (
        "config float for an int",
        lambda t, m: ["--config", write(t / "c.yaml", "data:\n  max_len: 2.5\n")],
        "--max_len 2.5 (data.max_len in ",
    ),
    ("seed flag not a number", lambda t, m: ["--seed", "seven"], "--seed seven: expected an integer"),
    ("ds config missing", lambda t, m: ["--ds_config", str(t / "none.json")], "no such file"),
    ("ds config not json", lambda t, m: ["--ds_config", write(t / "ds.json", "{")], "ds.json: not valid JSON"),
    (
        "global batch contradicts",
        lambda t, m: ["--ds_config", ds_file(t, train_batch_size=7)],
        "train_batch_size is 7 but --micro_batch × --grad_accum × world size",
    ),
    ("ds fp16", lambda t, m: ["--ds_config", ds_file(t, fp16={"enabled": True})], "fp16 is not supported"),
    (
        "ds optimizer section",
        lambda t, m: ["--ds_config", ds_file(t, optimizer={"type": "Adam"})],
        "remove the 'optimizer' section",
    ),
    (
        "ds zero stage 1",
        lambda t, m: ["--ds_config", ds_file(t, zero_optimization={"stage": 1})],
        "stage must be 2 or 3",
    ),
    ("data missing", lambda t, m: ["--data", str(t / "none.jsonl")], "none.jsonl: no such file"),
    ("data empty", lambda t, m: ["--data", write(t / "d.jsonl", "")], "d.jsonl: no records"),
    (
        "data bad json line",
        lambda t, m: ["--data", write(t / "d.jsonl", '{"prompt": "a", "completion": "b"}\n{x\n')],
        "d.jsonl:2: not valid JSON",
    ),
    (
        "data missing field",
        lambda t, m: ["--data", write(t / "d.jsonl", '{"prompt": "a"}\n')],
        "d.jsonl:1: field 'completion'",
    ),
    ("data dir without manifest", lambda t, m: ["--data", str(t)], "no manifest.json"),
    (
        "data smaller than a step",
        lambda t, m: ["--data", write(t / "d.jsonl", '{"prompt": "a", "completion": "b"}\n'), "--eval_data", ""],
        "1 rows, but one step needs 4",
    ),
    ("model dir missing", lambda t, m: ["--model", str(t / "nomodel")], "nomodel"),
    (
        "model without config.json",
        lambda t, m: ["--model", model_copy(m, t, drop=["config.json"])],
        "config.json is missing",
    ),
    (
        "model without weights",
        lambda t, m: ["--model", model_copy(m, t, drop=["*.safetensors"])],
        "no *.safetensors weights",
    ),
    ("model truncated shard", lambda t, m: ["--model", model_copy(m, t, truncate=2000)], "truncated"),
    ("tokenizer missing", lambda t, m: ["--model", model_copy(m, t, drop=["tokenizer*"])], "no tokenizer found"),
    (
        "latest names a missing tag",
        lambda t, m: checkpoint_dir(t, "step_00000009"),
        "names 'step_00000009', which is missing or incomplete",
    ),
    (
        "latest names a partial tag",
        lambda t, m: checkpoint_dir(t, "step_00000002"),
        "names 'step_00000002', which is missing or incomplete",
    ),
    (
        "checkpoints without latest",
        lambda t, m: checkpoint_dir(t, None, complete=True),
        "no 'latest' file; pass --resume step_00000002 to continue",
    ),
    (
        "resume tag incomplete",
        lambda t, m: checkpoint_dir(t, "step_00000002") + ["--resume", "step_00000002"],
        "--resume step_00000002",
    ),
]


@pytest.mark.parametrize("flags,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_nonzero_with_one_clear_message(tmp_path, neox_dir, flags, message):
    assert_refused(tmp_path, neox_dir, flags(tmp_path, neox_dir), message)


def test_a_tracker_that_is_not_installed_exits_nonzero_naming_the_flag(tmp_path, neox_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import blocked: as if it were not installed
    message = "--report_to wandb: the wandb package is not installed; pip install wandb"
    assert_refused(tmp_path, neox_dir, ["--report_to", "wandb"], message)


def assert_refused(tmp_path, neox_dir, flags: list[str], message: str) -> None:
    """The trainer with `flags` exits with status 2 and one error line holding `message`, no traceback, and
    leaves no artifact."""
    out = tmp_path / "out"
    args = [*train_args(neox_dir, out, max_steps=1, micro_batch=4), *flags]
    code, output = fork_trainer(args, tmp_path / "log")
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and message in errors[0], output[-3000:]
    assert "Traceback" not in output
    for artifact in ("adapter", "run_config.json", "metrics.jsonl"):
        assert not (out / artifact).exists()


@pytest.mark.distributed
def test_config_file_numbers_in_text_train_as_their_flags_would(tmp_path, neox_dir):
    """PyYAML reads `lr: 2e-4` as a string; it trains with lr 0.0002, as `--lr 2e-4` does ("7" likewise).

    A real process (one rank), not fork_trainer's fork, which is for runs that stop before training."""
    out = tmp_path / "out"
    config = write(tmp_path / "c.yaml", "train:\n  lr: 2e-4\n  seed: '7'\n  max_steps: 1\n")
    launch(train_args(neox_dir, out, micro_batch=4, config=config), nproc=1)
    train = json.loads((out / "run_config.json").read_text())["train"]
    assert train["lr"] == 0.0002 and train["seed"] == 7
