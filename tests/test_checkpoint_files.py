"""Which checkpoint a run resumes from: `latest`, complete tags, and the errors around them."""

from __future__ import annotations

import pytest
from fixtures import Payload
from helpers import eval_tiny_wikisql

from lora_ds.checkpoint import resolve_tag
from lora_ds.checkpoint_files import STATE_FILE
from lora_ds.errors import UserError


def make_tag(root, tag, complete=True):
    (root / tag).mkdir(parents=True)
    if complete:
        (root / tag / STATE_FILE).write_text('{"step": 1, "world_size": 2}')


def test_no_checkpoint_dir_starts_fresh(tmp_path):
    assert resolve_tag(str(tmp_path / "none"), "auto") is None


def test_latest_names_the_tag_to_resume(tmp_path):
    make_tag(tmp_path, "step_00000004")
    (tmp_path / "latest").write_text("step_00000004\n")
    assert resolve_tag(str(tmp_path), "auto") == "step_00000004"
    assert resolve_tag(str(tmp_path), "never") is None


def test_unfinished_tags_without_latest_warn_and_start_fresh(tmp_path):
    make_tag(tmp_path, "step_00000004", complete=False)
    with pytest.warns(UserWarning, match="unfinished checkpoint dirs"):
        assert resolve_tag(str(tmp_path), "auto") is None


def test_complete_tags_without_latest_are_an_error_naming_the_tag_to_resume(tmp_path):
    make_tag(tmp_path, "step_00000002")
    make_tag(tmp_path, "step_00000004")
    with pytest.raises(UserError, match="no 'latest' file; pass --resume step_00000004 to continue"):
        resolve_tag(str(tmp_path), "auto")
    assert resolve_tag(str(tmp_path), "step_00000002") == "step_00000002"
    assert resolve_tag(str(tmp_path), "never") is None


@pytest.mark.parametrize("complete", [False, None])
def test_latest_naming_a_missing_or_partial_tag_is_an_error(tmp_path, complete):
    if complete is not None:
        make_tag(tmp_path, "step_00000008", complete=complete)
    (tmp_path / "latest").write_text("step_00000008")
    with pytest.raises(UserError, match="names 'step_00000008', which is missing or incomplete"):
        resolve_tag(str(tmp_path), "auto")


def test_explicit_resume_tag_must_be_complete(tmp_path):
    make_tag(tmp_path, "step_00000002", complete=False)
    with pytest.raises(UserError, match="--resume step_00000002"):
        resolve_tag(str(tmp_path), "step_00000002")


def test_tags_newer_than_latest_are_ignored_with_a_warning(tmp_path):
    make_tag(tmp_path, "step_00000002")
    make_tag(tmp_path, "step_00000004", complete=False)
    make_tag(tmp_path, "step_00000006")  # sealed, but the rank died before renaming `latest`
    (tmp_path / "latest").write_text("step_00000002\n")
    with pytest.warns(
        UserWarning,
        match=r"ignoring step_00000004, step_00000006, newer than 'latest' "
        r"\(step_00000002\)",
    ):
        assert resolve_tag(str(tmp_path), "auto") == "step_00000002"


def test_prune_keeps_the_newest_complete_tags_and_drops_leftovers(tmp_path):
    from lora_ds.checkpoint import _prune

    for step in (2, 4, 6, 8):
        make_tag(tmp_path, f"step_0000000{step}", complete=step != 8)
    (tmp_path / "latest").write_text("step_00000006\n")
    (tmp_path / "latest.tmp-123").write_text("step_00000008\n")
    _prune(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000006"]


def test_resumed_metrics_drop_the_records_past_the_checkpoint(tmp_path):
    from lora_ds.train_loop import drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4')  # killed mid-line
    drop_metrics_after(str(path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    drop_metrics_after(str(path), 0)
    assert path.read_text() == ""


def test_a_pickle_carrying_a_payload_is_refused(tmp_path):
    import torch

    from lora_ds.checkpoint_files import load_pt

    marker = tmp_path / "pwned"
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, bad)
    with pytest.raises(UserError, match="refused to unpickle"):
        load_pt(str(bad))
    assert not marker.exists()


def test_deepspeed_files_load_with_the_allowlist(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from lora_ds.checkpoint_files import load_pt

    good = tmp_path / "optim.pt"
    torch.save(
        {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "fp32_flat_groups": [torch.ones(3)]}, good
    )
    loaded = load_pt(str(good), mmap=True)
    assert loaded["zero_stage"] == ZeroStageEnum.weights and loaded["fp32_flat_groups"][0].sum() == 3


def lora_tag(root, run_config: str) -> str:
    """A sealed tag that `latest` names, with an adapter config and the given run_config.json text."""
    import json

    from lora_ds.adapter import peft_config

    make_tag(root, "step_00000002")
    (root / "latest").write_text("step_00000002\n")
    (root / "step_00000002" / "adapter_config.json").write_text(
        json.dumps(
            peft_config(
                r=4, alpha=8, dropout=0.0, target_modules=["q"], use_rslora=False, fan_in_fan_out=False, base_model="t"
            )
        )
    )
    (root / "step_00000002" / "run_config.json").write_text(run_config)
    return str(root / "step_00000002" / "run_config.json")


def test_latest_naming_an_incomplete_tag_is_one_error_for_resume_export_and_eval(tmp_path):
    from lora_ds.consolidate import export_adapter
    from lora_ds.eval_model import read_lora

    make_tag(tmp_path, "step_00000002", complete=False)
    (tmp_path / "latest").write_text("step_00000002\n")
    message = (
        r"latest names 'step_00000002', which is missing or incomplete: .*step_00000002 is an incomplete "
        r"checkpoint \(no trainer_state.json; a rank died while saving\)"
    )
    for read in (
        lambda: resolve_tag(str(tmp_path), "auto"),
        lambda: read_lora(None, str(tmp_path)),
        lambda: export_adapter(str(tmp_path), str(tmp_path / "adapter")),
    ):
        with pytest.raises(UserError, match=message):
            read()
    assert not (tmp_path / "adapter").exists()


def test_a_malformed_run_config_in_a_checkpoint_is_a_clean_error_for_export_and_eval(tmp_path, wikisql_file, capsys):
    from lora_ds.cli import main
    from lora_ds.consolidate import export_adapter
    from lora_ds.eval_model import read_lora

    ckpt = tmp_path / "checkpoints"
    path = lora_tag(ckpt, '{"resolved": ')
    for read in (lambda: read_lora(None, str(ckpt)), lambda: export_adapter(str(ckpt), str(tmp_path / "adapter"))):
        with pytest.raises(UserError, match=f"{path}: not valid JSON"):
            read()
    assert main(["export-adapter", "--checkpoint", str(ckpt), "--out", str(tmp_path / "adapter")]) == 2
    assert eval_tiny_wikisql(wikisql_file, tmp_path / "eval", checkpoint=str(ckpt)) == 2
    err = capsys.readouterr().err
    assert f"lora-ds export-adapter: error: {path}: not valid JSON" in err
    assert f"lora-ds eval: error: {path}: not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "eval").exists()


def test_a_malformed_trainer_state_is_a_clean_error_naming_it(tmp_path):
    from lora_ds.checkpoint_files import read_state

    (tmp_path / STATE_FILE).write_text('{"step": 2')
    with pytest.raises(UserError, match=f"{tmp_path / STATE_FILE}: not valid JSON"):
        read_state(str(tmp_path))
