"""Format regression: a checkpoint and its run's adapter written by an earlier version (tests/data/format_v1/, its
README says how) still read with today's code: export, the adapter and checkpoint readers, PEFT, and resuming
training from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    DEMO_TOKENIZER,
    PROGRAMS,
    REPO,
    TRAIN_DATA,
    adapter_tensors,
    assert_close_tensors,
    assert_equal_tensors,
    launch,
    read_metrics,
    reference_lora,
    train_args,
)

from lora_ds.cli import main as cli

V1 = Path(__file__).parent / "data" / "format_v1"
PRESET = "preset:tiny-gpt-neox"
# The README's command: 3 steps on 2 ranks, checkpoints at steps 2 and 3, the adapter at step 3.
V1_FLAGS = dict(micro_batch=2, lora_r=4, lora_alpha=8, lr=1e-2, max_steps=3, save_every=2)
MODULES = ["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.attention.query_key_value"]


def v1_run_config() -> dict:
    return json.loads((V1 / "run_config.json").read_text())


def test_export_of_the_v1_checkpoint_is_its_adapter_bit_for_bit(tmp_path):
    from lora_ds.consolidate import export_adapter

    out = tmp_path / "exported"
    assert cli(["export-adapter", "--checkpoint", str(V1 / "checkpoints"), "--out", str(out)]) == 0
    exported, committed = adapter_tensors(out), adapter_tensors(V1 / "adapter")
    assert all(t.dtype == torch.float32 for t in committed.values())
    assert_equal_tensors(exported, committed)
    for name in ("adapter_config.json", "run_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((V1 / "adapter" / name).read_text()), name
    report = export_adapter(str(V1 / "checkpoints"), str(tmp_path / "step2"), tag="step_00000002")
    assert (report["world_size"], report["modules"], report["params"]) == (2, 2, 2 * 4 * (64 + 192))
    step2 = adapter_tensors(tmp_path / "step2")
    assert sorted(step2) == sorted(committed) and not torch.equal(
        step2[f"{MODULES[0]}.lora_B.weight"], committed[f"{MODULES[0]}.lora_B.weight"]
    )


def test_the_v1_adapter_and_checkpoint_read_through_lora_ds_readers():
    from lora_ds.adapter import read_adapter
    from lora_ds.checkpoint import resolve_tag
    from lora_ds.checkpoint_files import read_state, read_zero3_state
    from lora_ds.eval_model import base_seed, read_lora

    config, tensors = read_adapter(str(V1 / "adapter"))
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == (
        "LORA",
        4,
        8.0,
        ["query_key_value"],
    )
    assert config["base_model_name_or_path"] == PRESET and config["fan_in_fan_out"] is False
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        **{f"{m}.lora_A.weight": (4, 64) for m in MODULES},
        **{f"{m}.lora_B.weight": (192, 4) for m in MODULES},
    }
    assert_equal_tensors(tensors, adapter_tensors(V1 / "adapter"))
    lora = read_lora(str(V1 / "adapter"), None)
    assert lora.modules == MODULES and base_seed(lora) == 42 and lora.run_config == v1_run_config()
    from_checkpoint = read_lora(None, str(V1 / "checkpoints"))  # what `lora-ds eval --checkpoint` reads
    assert from_checkpoint.config == config
    assert_equal_tensors(from_checkpoint.tensors, tensors)

    ckpt = V1 / "checkpoints"
    assert resolve_tag(str(ckpt), "auto") == "step_00000003"
    state = read_state(str(ckpt / "step_00000002"))
    assert (state["step"], state["samples"], state["world_size"]) == (2, 8, 2)
    saved, world, adam_step = read_zero3_state(str(ckpt / "step_00000002"), moments=True)
    assert world == 2 and adam_step.item() == 2 and sorted(saved) == sorted(tensors)
    for name, parts in saved.items():
        assert {k: tuple(v.shape) for k, v in parts.items()} == dict.fromkeys(
            ("fp32", "exp_avg", "exp_avg_sq"), tuple(tensors[name].shape)
        )
        assert parts["exp_avg_sq"].min() >= 0 and parts["exp_avg_sq"].max() > 0


@pytest.fixture(scope="module")
def v1_base(tmp_path_factory) -> Path:
    """The preset base the v1 run trained on, drawn as the trainer draws it (tests/programs/preset_base.py) from the
    seed its run config records, and saved as a Hugging Face model dir."""
    from lora_ds.eval_model import base_seed, read_lora

    out = tmp_path_factory.mktemp("v1_base")
    seed = base_seed(read_lora(str(V1 / "adapter"), None))
    launch(
        ["--model", PRESET, "--tokenizer", DEMO_TOKENIZER, "--seed", seed, "--out", out],
        nproc=1,
        program=PROGRAMS / "preset_base.py",
        timeout=600,
    )
    return out


@pytest.mark.distributed
def test_the_rebuilt_preset_base_is_the_one_v1_trained_on(v1_base):
    """At step 1 every lora_B is 0: the loss v1 logged for step 1 is its base's loss on step 1's rows."""
    from transformers import AutoModelForCausalLM

    from lora_ds.data import StepSampler, collate, load_rows
    from lora_ds.loss import lm_loss
    from lora_ds.tokenizer import load_tokenizer

    run = v1_run_config()
    train, world = run["train"], run["resolved"]["world_size"]
    tok = load_tokenizer(str(v1_base))
    assert run["data"]["path"] == str(TRAIN_DATA.relative_to(REPO))
    rows = load_rows(str(TRAIN_DATA), tok, run["data"]["max_len"])
    sampler = StepSampler(len(rows), train["micro_batch"], train["grad_accum"], world, train["seed"])
    model = AutoModelForCausalLM.from_pretrained(v1_base, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [
            lm_loss(model, collate([rows[i] for i in batch], tok.pad_token_id))[0].item()
            for rank in range(world)
            for batch in sampler.micro_batches(0, rank)
        ]
    assert sum(losses) / len(losses) == pytest.approx(read_metrics(V1)[0]["loss"], rel=1e-6)


@pytest.mark.distributed
def test_the_v1_adapter_loads_in_peft_on_its_base_and_gives_lora_ds_eval_logits(v1_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.eval_model import build_eval_model, read_lora
    from lora_ds.tokenizer import load_tokenizer

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(v1_base, dtype=torch.float32), V1 / "adapter"
    ).eval()
    ours, _, _ = build_eval_model(
        str(v1_base), load_tokenizer(str(v1_base)), read_lora(str(V1 / "adapter"), None), "fp32", None
    )
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        with peft_model.disable_adapter():
            assert (expected - peft_model(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.distributed
def test_training_resumes_from_the_v1_checkpoint_to_v1s_own_next_step(v1_base, tmp_path):
    """The v1 run's output dir without its step-3 checkpoint and adapter, resumed on 2 ranks from step 2: step 3
    gives the loss v1 logged and the adapter v1 wrote, and the plain-PyTorch step from the v1 state."""
    from transformers import AutoModelForCausalLM

    from lora_ds.checkpoint_files import read_zero3_params
    from lora_ds.tokenizer import load_tokenizer

    run = tmp_path / "run"
    shutil.copytree(V1, run, ignore=shutil.ignore_patterns("step_00000003", "adapter"))
    resumed = launch(train_args(PRESET, run, resume="step_00000002", **V1_FLAGS))
    assert "step_00000002 at step 2" in resumed.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert read_metrics(run)[:2] == read_metrics(V1)[:2]
    assert read_metrics(run)[2]["loss"] == pytest.approx(read_metrics(V1)[2]["loss"], rel=1e-5)
    ours = adapter_tensors(run / "adapter")
    assert_close_tensors(ours, adapter_tensors(V1 / "adapter"), rtol=0, atol=3e-5)
    model = AutoModelForCausalLM.from_pretrained(v1_base, dtype=torch.float32)
    reference = reference_lora(
        model,
        load_tokenizer(str(v1_base)),
        ["query_key_value"],
        steps=range(2, 3),
        world=2,
        micro=2,
        accum=1,
        seed=42,
        max_len=512,
        tag_dir=V1 / "checkpoints" / "step_00000002",
    )
    assert_close_tensors(ours, reference, rtol=1e-4, atol=3e-5)
    step2, _ = read_zero3_params(str(V1 / "checkpoints" / "step_00000002"))
    assert min((ours[n] - step2[n]).abs().max().item() for n in ours) > 1e-4  # the step moved every tensor
