"""The config tree: precedence, unknown keys, validation, and the one batch rule."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from helpers import REPO, ds_config_file

from lora_ds.config import SECTION_TYPES, build_parser, parse_config, resolve_ds_config
from lora_ds.errors import UserError


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


@pytest.mark.parametrize(
    "text,message",
    [
        ("lora:\n  rank: 4\n", "unknown key lora.rank"),
        ("optimizer:\n  lr: 1\n", "unknown section 'optimizer'"),
        ("lora: 3\n", "section 'lora' must be a mapping"),
        ("lora:\n  r: 0\n", "--lora_r 0"),
        ("lora: [\n", "cannot parse"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_config(["--config", str(cfg_file)])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lora_r", "0"], "--lora_r 0"),
        (["--lora_alpha", "-2"], "--lora_alpha -2"),
        (["--dtype", "fp16"], "fp16 is not supported"),
        (["--micro_batch", "0"], "--micro_batch 0"),
        (["--lr", "0"], "--lr 0"),
        (["--config", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_bad_flags_name_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        parse_config(flags)


def test_lora_targets_flag_takes_names_or_a_regex():
    assert parse_config(["--lora_targets", "q_proj, v_proj"]).lora.target_spec() == ["q_proj", "v_proj"]
    assert parse_config(["--lora_targets", r"re:.*\.(q|v)_proj"]).lora.target_spec() == r".*\.(q|v)_proj"
    assert parse_config([]).lora.target_spec() is None


def test_report_to_takes_a_list_of_trackers_or_none(tmp_path):
    assert parse_config([]).train.report_to == []
    assert parse_config(["--report_to", "none"]).train.report_to == []
    assert parse_config(["--report_to", "tensorboard, wandb,tensorboard"]).train.report_to == ["tensorboard", "wandb"]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("train:\n  report_to: [wandb]\n")
    assert parse_config(["--config", str(cfg_file)]).train.report_to == ["wandb"]
    with pytest.raises(UserError, match=r"--report_to tensorboard,mlflow: choose tensorboard, wandb \(comma"):
        parse_config(["--report_to", "tensorboard,mlflow"])
    with pytest.raises(UserError, match="--report_to none,wandb: choose"):
        parse_config(["--report_to", "none,wandb"])


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_every_shipped_ds_config_resolves(name):
    cfg = parse_config(["--ds_config", str(REPO / "ds_configs" / name), "--micro_batch", "3", "--grad_accum", "5"])
    ds = resolve_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(ds)


def test_deepspeed_throughput_timer_is_off_unless_the_file_sets_it(tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    # Its synchronize at each forward's start and step's end would drain the GPU's queue twice a step.
    ds = resolve_ds_config(parse_config(["--ds_config", str(REPO / "ds_configs" / "zero3.json")]), world_size=1)
    assert DeepSpeedConfig(ds).timers_config.enabled is False
    own = ds_config_file(tmp_path / "ds.json", timers={"throughput": {"enabled": True}})
    ds = resolve_ds_config(parse_config(["--ds_config", own]), world_size=1)
    assert DeepSpeedConfig(ds).timers_config.enabled is True


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(train_batch_size=10), "train_batch_size is 10 but --micro_batch × --grad_accum × world size"),
        (dict(train_micro_batch_size_per_gpu=8), "train_micro_batch_size_per_gpu is 8 but --micro_batch"),
        (dict(gradient_clipping=0.5), "gradient_clipping is 0.5 but --max_grad_norm"),
        (dict(fp16={"enabled": True}), "fp16 is not supported"),
        (dict(optimizer={"type": "Adam"}), "remove the 'optimizer' section"),
        (dict(zero_optimization={"stage": 1}), "stage must be 2 or 3"),
    ],
)
def test_ds_config_contradicting_flags_is_an_error(tmp_path, overrides, message):
    cfg = parse_config(["--ds_config", ds_config_file(tmp_path / "ds.json", **overrides), "--micro_batch", "4"])
    with pytest.raises(UserError, match=message):
        resolve_ds_config(cfg, world_size=2)


def test_explicit_ds_values_that_agree_are_accepted(tmp_path):
    cfg = parse_config(
        [
            "--ds_config",
            ds_config_file(tmp_path / "ds.json", train_batch_size=16),
            "--micro_batch",
            "4",
            "--grad_accum",
            "2",
        ]
    )
    assert resolve_ds_config(cfg, world_size=2)["train_batch_size"] == 16


def config_file(tmp_path, text: str) -> list[str]:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return ["--config", str(path)]


def test_file_values_are_converted_as_their_flags_are(tmp_path):
    # PyYAML reads 2e-4 (no dot) as a string and '7' is one; both convert as `--lr 2e-4`, `--seed 7` would.
    cfg = parse_config(config_file(tmp_path, "train:\n  lr: 2e-4\n  seed: '7'\n  epochs: 2\nlora:\n  r: '4'\n"))
    assert cfg.train.lr == 0.0002 and type(cfg.train.lr) is float
    assert cfg.train.seed == 7 and cfg.lora.r == 4 and cfg.train.epochs == 2.0
    assert cfg == parse_config(["--lr", "2e-4", "--seed", "7", "--epochs", "2", "--lora_r", "4"])
    json_cfg = parse_config(config_file(tmp_path, '{"model": {"tokenizer": null, "grad_ckpt": true}}'))
    assert json_cfg.model.tokenizer is None and json_cfg.model.grad_ckpt is True


@pytest.mark.parametrize(
    "text,message",
    [
        ("train:\n  seed: seven\n", r"--seed seven \(train.seed in .*run.yaml\): expected an integer"),
        ("train:\n  seed: 2.5\n", r"--seed 2.5 \(train.seed in .*\): expected an integer"),
        ("train:\n  seed: true\n", r"--seed True \(train.seed in .*\): expected an integer"),
        ("train:\n  lr: fast\n", r"--lr fast \(train.lr in .*\): expected a number"),
        ("model:\n  grad_ckpt: 'yes'\n", r"--grad_ckpt yes \(model.grad_ckpt in .*\): expected true or false"),
        ("model:\n  dtype: 16\n", r"--dtype 16 \(model.dtype in .*\): expected a string"),
        ("lora:\n  targets: [q_proj, 3]\n", r"--lora_targets \['q_proj', 3\] \(lora.targets in .*\): expected a list"),
        ("train:\n  micro-batch: 2\n", "unknown key train.micro-batch"),  # aliases are flags' only; keys are the fields
    ],
)
def test_file_values_of_the_wrong_type_name_key_file_and_flag(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        parse_config(config_file(tmp_path, text))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seed", "seven"], "--seed seven: expected an integer"),
        (["--max_len", "2.5"], "--max_len 2.5: expected"),
        (["--lora_alpha", "x"], "--lora_alpha x: expected a number"),
    ],
)
def test_flag_text_of_the_wrong_type_names_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        parse_config(flags)


def test_a_flag_overriding_a_bad_file_value_wins_and_errors_name_where_the_value_came_from(tmp_path):
    assert parse_config([*config_file(tmp_path, "train:\n  seed: seven\n"), "--seed", "3"]).train.seed == 3
    with pytest.raises(UserError, match=r"^--seed x: expected"):
        parse_config([*config_file(tmp_path, "train:\n  seed: 1\n"), "--seed", "x"])


def test_library_use_names_the_field():
    from lora_ds.config import LoraConfig, TrainConfig

    with pytest.raises(UserError, match=r"^lora.r 0: the rank must be a positive integer$"):
        LoraConfig(r=0)
    with pytest.raises(UserError, match=r"^train.micro_batch 2.5: expected an integer$"):
        TrainConfig(micro_batch=2.5)


TRAIN_FLAGS = [
    (f.metadata["flag"], typing.get_type_hints(cls)[f.name] is bool)
    for cls in SECTION_TYPES.values()
    for f in dataclasses.fields(cls)
    if "_" in f.metadata["flag"]
]


@pytest.mark.parametrize("flag,switch", TRAIN_FLAGS, ids=[f for f, _ in TRAIN_FLAGS])
def test_every_train_flag_also_takes_its_hyphenated_spelling(flag, switch):
    parser, alias = build_parser(), flag.replace("_", "-")
    spellings = [(flag, alias), ("--no-" + flag[2:], "--no-" + alias[2:])] if switch else [(flag, alias)]
    argv = (lambda spelling: [spelling]) if switch else (lambda spelling: [spelling, "7"])
    for canonical, other in spellings:
        assert (
            vars(parser.parse_args(argv(other)))
            == vars(parser.parse_args(argv(canonical)))
            != vars(parser.parse_args([]))
        )


def test_hyphenated_train_flags_resolve_to_the_same_config():
    assert parse_config(
        ["--max-len", "64", "--micro-batch", "2", "--lora-r", "4", "--grad-ckpt", "--eval-data", ""]
    ) == parse_config(["--max_len", "64", "--micro_batch", "2", "--lora_r", "4", "--grad_ckpt", "--eval_data", ""])


EVAL_ARGS = ["eval", "--model", "m", "--task", "wikisql", "--data", "d", "--out", "o"]


@pytest.mark.parametrize(
    "spellings,value,dest",
    [
        (["--max_len", "--max-len"], "64", "max_len"),
        (["--micro_batch", "--micro-batch", "--batch-size"], "3", "batch_size"),
        (["--max_new_tokens", "--max-new-tokens"], "5", "max_new_tokens"),
        (["--num_beams", "--num-beams"], "2", "num_beams"),
        (["--ds_config", "--ds-config"], "ds.json", "ds_config"),
        (["--no_progress", "--no-progress"], None, "no_progress"),
    ],
)
def test_eval_flags_are_spelled_as_train_spells_them_and_old_spellings_still_work(spellings, value, dest):
    from lora_ds.cli import build_parser as cli_parser

    parser = cli_parser()
    default = getattr(parser.parse_args(EVAL_ARGS), dest)
    given = {getattr(parser.parse_args([*EVAL_ARGS, s, *([value] if value else [])]), dest) for s in spellings}
    assert len(given) == 1 and given != {default}
