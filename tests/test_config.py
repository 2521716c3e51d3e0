"""The config tree: precedence, unknown keys, validation, and the one batch rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_ds.config import parse_config, resolve_ds_config
from lora_ds.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_then_file_then_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lora:\n  r: 16\n  alpha: 32\ntrain:\n  lr: 0.001\n  micro_batch: 2\n")
    cfg = parse_config(["--config", str(cfg_file), "--lora_r", "4", "--grad_ckpt"])
    assert cfg.lora.r == 4 and cfg.lora.alpha == 32.0
    assert cfg.train.lr == 0.001 and cfg.train.micro_batch == 2
    assert cfg.train.weight_decay == 0.1 and cfg.model.grad_ckpt is True


def test_json_config_and_deepspeed_launcher_local_rank(tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"lora": {"targets": ["q_proj", "v_proj"]}, "train": {"max_steps": 5}}))
    cfg = parse_config(["--local_rank=1", "--config", str(cfg_file)])
    assert cfg.lora.target_spec() == ["q_proj", "v_proj"] and cfg.train.max_steps == 5


@pytest.mark.parametrize("text,message", [
    ("lora:\n  rank: 4\n", "unknown key lora.rank"),
    ("optimizer:\n  lr: 1\n", "unknown section 'optimizer'"),
    ("lora: 3\n", "section 'lora' must be a mapping"),
    ("lora:\n  r: 0\n", "--lora_r 0"),
    ("lora: [\n", "cannot parse"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_config(["--config", str(cfg_file)])


@pytest.mark.parametrize("flags,message", [
    (["--lora_r", "0"], "--lora_r 0"), (["--lora_alpha", "-2"], "--lora_alpha -2"),
    (["--dtype", "fp16"], "fp16 is not supported"), (["--micro_batch", "0"], "--micro_batch 0"),
    (["--lr", "0"], "--lr 0"), (["--config", "/nonexistent.yaml"], "no such file"),
])
def test_bad_flags_name_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        parse_config(flags)


def test_lora_targets_flag_takes_names_or_a_regex():
    assert parse_config(["--lora_targets", "q_proj, v_proj"]).lora.target_spec() == ["q_proj", "v_proj"]
    assert parse_config(["--lora_targets", r"re:.*\.(q|v)_proj"]).lora.target_spec() == r".*\.(q|v)_proj"
    assert parse_config([]).lora.target_spec() is None


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_every_shipped_ds_config_resolves(name):
    cfg = parse_config(["--ds_config", str(REPO / "ds_configs" / name), "--micro_batch", "3", "--grad_accum", "5"])
    ds = resolve_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(ds)


def write_ds(tmp_path, **overrides) -> str:
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text()) | overrides
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize("overrides,message", [
    (dict(train_batch_size=10), "train_batch_size is 10 but --micro_batch × --grad_accum × world size"),
    (dict(train_micro_batch_size_per_gpu=8), "train_micro_batch_size_per_gpu is 8 but --micro_batch"),
    (dict(gradient_clipping=0.5), "gradient_clipping is 0.5 but --max_grad_norm"),
    (dict(fp16={"enabled": True}), "fp16 is not supported"),
    (dict(optimizer={"type": "Adam"}), "remove the 'optimizer' section"),
    (dict(zero_optimization={"stage": 1}), "stage must be 2 or 3"),
])
def test_ds_config_contradicting_flags_is_an_error(tmp_path, overrides, message):
    cfg = parse_config(["--ds_config", write_ds(tmp_path, **overrides), "--micro_batch", "4"])
    with pytest.raises(UserError, match=message):
        resolve_ds_config(cfg, world_size=2)


def test_explicit_ds_values_that_agree_are_accepted(tmp_path):
    cfg = parse_config(["--ds_config", write_ds(tmp_path, train_batch_size=16), "--micro_batch", "4",
                        "--grad_accum", "2"])
    assert resolve_ds_config(cfg, world_size=2)["train_batch_size"] == 16
