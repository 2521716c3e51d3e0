"""`lora-ds export-adapter` on real ZeRO-3 checkpoints of 1, 2 and 3 CPU ranks (gloo), as the trainer writes them.

Each checkpoint comes from launcher/train.py's Recipe run by tests/programs/train_oracles.py (lora_ds.checkpoint.save
through a real engine, then the run's final adapter). Oracles: DeepSpeed's own zero_to_fp32 consolidation
(restricted to LoRA keys), the live gathered params and fp32 masters of the engine that wrote the checkpoint, the
trainer's own final adapter, and PEFT loading the exported adapter.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixtures import save_tiny
from helpers import (
    DEMO_TOKENIZER,
    PROGRAMS,
    ZERO3,
    assert_equal_tensors,
    ds_config_file,
    launch_together,
    read_reports,
    train_args,
)

from lora_ds.adapter import read_adapter
from lora_ds.cli import main
from lora_ds.consolidate import export_adapter
from lora_ds.errors import UserError

pytestmark = pytest.mark.distributed

R, ALPHA, SEED = 4, 8, 11
TAG = "step_00000002"
VOCAB = 512

# world size -> (base model type, --lora_targets, --dtype, ZeRO-3 param persistence threshold, program flags).
# Together: 1, 2 and 3 ranks; fp32 and bf16 (bf16_-prefixed optimizer files); padded partitions (3 ranks); frozen
# fragments saved (2 ranks); GPT-2's Conv1D; the live merge with every weight partitioned (2) and with every
# weight persisted (3); #17's variants (3: Conv1D, bf16, padded partitions): DoRA's magnitude vectors, layer 0 at
# rank 6 (RANK_PATTERN), LoRA+ (two param groups: A's, and B's with the magnitudes, as PEFT groups them).
RANK_PATTERN = {r"h\.0\.attn\.c_attn": 6}
VARIANT = ["--use_dora", "--lora_rank_pattern", f"{next(iter(RANK_PATTERN))}=6", "--loraplus_lr_ratio", "4"]
RUNS = {
    1: ("gpt_neox", "query_key_value", "fp32", 0, []),
    2: ("gpt_neox", "query_key_value", "fp32", 0, ["--with_frozen", "--live_merge"]),
    3: ("gpt2", "c_attn", "bf16", 10**9, ["--live_merge", *VARIANT]),
}
# LoRA params per run: two modules of 64 in, 192 out, at rank 4, or at 6 and 4 with 192 magnitudes each.
PARAMS = {1: 2 * R * (64 + 192), 2: 2 * R * (64 + 192), 3: (6 + R) * (64 + 192) + 2 * 192}


def dora(world: int) -> bool:
    return "--use_dora" in RUNS[world][4]


def tensor_count(world: int) -> int:
    """A, B (and DoRA's magnitude) of each of the two adapted modules."""
    return 2 * (3 if dora(world) else 2)


@dataclass
class Run:
    base: Path  # the tiny base model dir it trained on
    out: Path  # its --output_dir

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoints"

    @property
    def oracles(self) -> Path:
        return self.out / "oracles"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Run]:
    """{world: Run} of 2 steps (lr 1e-2) with a checkpoint at step 2, all started together: the runs wait on each
    other's startup and gloo, so together they share the two cores."""
    root = tmp_path_factory.mktemp("export")
    runs, launches = {}, []
    for world, (model_type, targets, dtype, persistence, extra) in RUNS.items():
        run = runs[world] = Run(
            save_tiny(model_type, VOCAB, root / f"base_w{world}", tokenizer=DEMO_TOKENIZER), root / f"w{world}"
        )
        zero = {**ZERO3["zero_optimization"], "stage3_param_persistence_threshold": persistence}
        args = train_args(
            run.base,
            run.out,
            lora_targets=targets,
            dtype=dtype,
            lora_r=R,
            lora_alpha=ALPHA,
            seed=SEED,
            lr=1e-2,
            micro_batch=2,
            max_len=64,
            max_steps=2,
            save_every=2,
            ds_config=ds_config_file(root / f"ds_w{world}.json", zero_optimization=zero),
            oracles=run.oracles,
        )
        launches.append(dict(args=[*args, *extra], nproc=world, program=PROGRAMS / "train_oracles.py"))
    launch_together(*launches)
    return runs


def lora_keys_of_zero_to_fp32(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG, exclude_frozen_parameters=True)
    return {
        k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k or k.endswith(".lora_magnitude_vector")
    }


@pytest.mark.parametrize("world", sorted(RUNS))
def test_export_equals_zero_to_fp32_and_the_live_engine_params(runs, world, tmp_path):
    from safetensors.torch import load_file

    ckpt = runs[world].ckpt
    report = export_adapter(str(ckpt), str(tmp_path / "adapter"))
    assert report["world_size"] == world and report["modules"] == 2 and report["params"] == PARAMS[world]
    _, ours = read_adapter(str(tmp_path / "adapter"))
    oracle = lora_keys_of_zero_to_fp32(ckpt)
    master, live = (load_file(runs[world].oracles / f"{name}.safetensors") for name in ("master", "live"))
    assert sorted(ours) == sorted(oracle) == sorted(master) == sorted(live) and len(ours) == tensor_count(world)
    for name, value in ours.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, oracle[name]), name
        assert torch.equal(value, master[name]), name
        assert torch.equal(value.to(live[name].dtype), live[name]), name
    from lora_ds.checkpoint_files import load_pt

    [optim_file] = (ckpt / TAG).glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")  # bf16_-prefixed in bf16
    optim = load_pt(str(optim_file), mmap=True)["optimizer_state_dict"]
    assert len(optim["fp32_flat_groups"]) == (2 if world == 3 else 1)  # LoRA+: A's group and B's
    trained_B = max(v.abs().max().item() for k, v in ours.items() if "lora_B" in k)
    assert trained_B > 1e-3  # two AdamW steps at lr 1e-2 moved B off its zero init


@pytest.mark.parametrize("world", sorted(RUNS))
def test_exported_adapter_loads_in_peft_and_gives_our_logits(runs, world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import inject_adapter
    from lora_ds.lora import lora_parameters

    base, ckpt = runs[world].base, runs[world].ckpt
    model_type, targets, *_ = RUNS[world]
    export_adapter(str(ckpt), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (R, ALPHA, [targets])
    assert config["rank_pattern"] == (RANK_PATTERN if world == 3 else {})
    assert config["fan_in_fan_out"] is (model_type == "gpt2") and config["base_model_name_or_path"] == str(base)
    assert config["use_dora"] is dora(world)
    assert json.loads((tmp_path / "adapter" / "run_config.json").read_text())["resolved"]["world_size"] == world

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter"
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    inject_adapter(ours, config)
    params = lora_parameters(ours)
    _, tensors = read_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        with peft_model.disable_adapter():
            assert (expected - peft_model(input_ids=ids).logits).abs().max() > 1e-4


def test_the_two_rank_checkpoint_really_holds_frozen_fragments(runs):
    """So that the oracle test above proves the export ignores them (the bench measures that it never reads them)."""
    from lora_ds.checkpoint_files import load_pt

    state = load_pt(str(runs[2].ckpt / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"), mmap=True)
    fragments = state["frozen_param_fragments"]
    base_numel = sum(math.prod(s) for s in state["frozen_param_shapes"].values())
    assert len(fragments) == len(state["frozen_param_shapes"]) > 20
    assert sum(t.numel() for t in fragments.values()) >= base_numel // 2  # this rank's half of the base
    lora_only = load_pt(str(runs[1].ckpt / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"), mmap=True)
    assert lora_only["frozen_param_fragments"] is None


@pytest.mark.parametrize("world", [2, 3])
def test_live_zero3_merge_for_eval_gives_lora_logits_and_restores_partitions_bitwise(runs, world):
    for report in read_reports(runs[world].oracles, "report", world):
        assert report["persistent"] == [world == 3] * 2  # both paths: gathered on demand, and persisted
        assert report["lora_calls_while_merged"] == 0
        # fp32: the same sums in another order; bf16: the merged weight is rounded to bf16 once.
        assert report["merged_vs_unmerged"] < (1e-5 if RUNS[world][2] == "fp32" else 2e-2)
        assert report["after_equals_before"] and report["partitions_restored"]
        assert report["partition_numel"] == 2 * -(-64 * 192 // world)


def test_cli_exports_the_latest_tag_in_bf16(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt, out = runs[2].ckpt, tmp_path / "adapter"
    assert main(["export-adapter", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(ckpt / TAG)
    saved = load_file(out / "adapter_model.safetensors")
    master = load_file(runs[2].oracles / "master.safetensors")
    assert sorted(saved) == sorted("base_model.model." + k for k in master)
    for key, value in saved.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, master[key.removeprefix("base_model.model.")].to(torch.bfloat16))


def _drop(name):
    return lambda tag_dir, runs: (tag_dir / name).unlink()


def _edit_json(name, **changes):
    def edit(tag_dir, runs):
        path = tag_dir / name
        data = json.loads(path.read_text())
        for key, value in changes.items():
            if key == "adapted_modules":
                data["resolved"]["adapted_modules"] = value
            else:
                data[key] = value
        path.write_text(json.dumps(data))

    return edit


def _add_rank_of_another_run(tag_dir, runs):
    shutil.copy(runs[3].ckpt / TAG / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt", tag_dir)


BROKEN = {
    "missing_rank": (
        _drop("zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        r"written by 2 ranks .* holds optimizer files of ranks \[0\] \(missing: rank 1\)",
    ),
    "rank_of_another_run": (
        _add_rank_of_another_run,
        r"written by 2 ranks .* holds optimizer files of ranks \[0, 1, 2\]",
    ),
    "no_latest": (
        lambda tag_dir, runs: (tag_dir.parent / "latest").unlink(),
        r"no 'latest' file; pass --tag \(tags here: step_00000002\)",
    ),
    "incomplete": (_drop("trainer_state.json"), r"incomplete checkpoint \(no trainer_state.json"),
    "no_adapter_config": (_drop("adapter_config.json"), r"adapter_config.json: missing; the trainer writes"),
    "run_config_not_json": (
        lambda tag_dir, runs: (tag_dir / "run_config.json").write_text('{"resolved": '),
        r"run_config.json: not valid JSON",
    ),
    "wrong_r": (_edit_json("adapter_config.json", r=8), r"lora_A \[4, 64\] .* says r = 8"),
    "wrong_targets": (
        _edit_json("adapter_config.json", target_modules=["dense"]),
        r"not selected by target_modules \['dense'\]",
    ),
    "module_lost": (
        _edit_json(
            "run_config.json",
            adapted_modules=[
                "gpt_neox.layers.0.attention.query_key_value",
                "gpt_neox.layers.1.attention.query_key_value",
                "gpt_neox.layers.2.attention.query_key_value",
            ],
        ),
        r"lists 3 adapted modules but the checkpoint holds LoRA for 2 \(not found: "
        r"gpt_neox.layers.2.attention.query_key_value\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_refused_with_a_clear_message(runs, case, tmp_path, capsys):
    break_it, message = BROKEN[case]
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(runs[2].ckpt, ckpt)
    break_it(ckpt / TAG, runs)
    out = tmp_path / "adapter"
    with pytest.raises(UserError, match=message):
        export_adapter(str(ckpt), str(out))
    assert main(["export-adapter", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "lora-ds export-adapter: error:" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("world", sorted(RUNS))
def test_export_is_the_trainers_own_final_adapter_and_merges_into_its_base(runs, world, tmp_path):
    """The run ended at its checkpoint: the exported adapter is the trainer's own final adapter bit for bit, and
    it merges into the base with --verify."""
    run, exported = runs[world], tmp_path / "exported"
    assert main(["export-adapter", "--checkpoint", str(run.ckpt), "--out", str(exported)]) == 0
    config, tensors = read_adapter(str(exported))
    trainer_config, trained = read_adapter(str(run.out / "adapter"))
    assert config == trainer_config and len(trained) == tensor_count(world)
    assert_equal_tensors(tensors, trained)
    assert (
        main(
            [
                "merge",
                "--base",
                str(run.base),
                "--adapter",
                str(exported),
                "--out",
                str(tmp_path / "merged"),
                "--verify",
            ]
        )
        == 0
    )
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


# The variants the runs above do not hold, each on 3 ranks of a GPT-NeoX in padded partitions (3 does not divide
# the head's 514 × 64, nor the 4-bit packing of the 256 × 64 dense weights): PiSSA (a converted rank-2r adapter
# and lora_init.safetensors) with the head trained in full and 2 added tokens (embed_in joins modules_to_save),
# QLoRA with DoRA (the packed 4-bit base partitioned, the magnitudes from its dequantized weights), and QLoRA with
# OLoRA (the requantized residual partitioned, the adapter converted to rank 2r).
VARIANTS_ON_3 = {
    "pissa_saved_modules_added_tokens": dict(
        dtype="bf16", init_lora_weights="pissa", modules_to_save="lm_head", add_tokens="TOKENS"
    ),
    "qlora_dora": dict(dtype="fp32", quantize="nf4", use_dora=True),
    "qlora_olora": dict(dtype="fp32", quantize="nf4", init_lora_weights="olora"),
}


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory) -> dict[str, Run]:
    """{variant: Run} of VARIANTS_ON_3, 2 steps on 3 ranks with a checkpoint at step 2, started together."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("export_variants")
    (root / "tokens.txt").write_text("SELECT\nWHERE\n")
    base = save_tiny("gpt_neox", VOCAB, root / "base", tokenizer=DEMO_TOKENIZER)
    runs, launches = {}, []
    for name, variant in VARIANTS_ON_3.items():
        run = runs[name] = Run(base, root / name)
        values = {k: (str(root / "tokens.txt") if v == "TOKENS" else v) for k, v in variant.items()}
        args = train_args(
            base, run.out, lora_r=R, lora_alpha=ALPHA, seed=SEED, lr=1e-2, micro_batch=2, max_len=64, max_steps=2,
            save_every=2, **values,
        )  # fmt: skip
        launches.append(dict(args=args, nproc=3))
    launch_together(*launches)
    return runs


@pytest.mark.parametrize("variant", sorted(VARIANTS_ON_3))
def test_each_variant_exports_from_a_three_rank_checkpoint_as_the_trainer_saved_it(variant_runs, variant, tmp_path):
    run, exported = variant_runs[variant], tmp_path / "exported"
    report = export_adapter(str(run.ckpt), str(exported))
    assert report["world_size"] == 3
    config, tensors = read_adapter(str(exported))
    trainer_config, trained = read_adapter(str(run.out / "adapter"))
    assert config == trainer_config
    assert_equal_tensors(tensors, trained)
    if variant.startswith("pissa"):
        # PEFT's conversion: rank 2r against the original base; the head and the grown embedding whole.
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (2 * R, 2 * ALPHA, True)
        assert config["modules_to_save"] == ["lm_head", "embed_in"]
        assert tensors["lm_head.weight"].shape == tensors["gpt_neox.embed_in.weight"].shape == (VOCAB + 2, 64)
        tokenizer = (run.out / "adapter" / "tokenizer.json").read_text()
        assert (exported / "tokenizer.json").read_text() == tokenizer
    elif variant == "qlora_olora":
        assert (config["r"], config["init_lora_weights"], len(tensors)) == (2 * R, True, 2 * 2)
    else:
        assert config["use_dora"] and len(tensors) == 2 * 3  # A, B and the magnitude of both modules
    assert max(v.abs().max().item() for k, v in tensors.items() if "lora_B" in k) > 1e-3


def test_eval_from_the_three_rank_checkpoint_with_saved_modules_gives_what_its_adapter_gives(
    variant_runs, wikisql_file, tmp_path
):
    """`lora-ds eval --checkpoint` of the PiSSA run (converted LoRA, the head and grown embedding, the tokenizer
    of the tag) predicts and scores as `--adapter` of the trainer's adapter."""
    run = variant_runs["pissa_saved_modules_added_tokens"]
    common = ["--model", str(run.base), "--task", "wikisql", "--data", str(wikisql_file), "--dtype", "fp32"]
    common += ["--max-new-tokens", "16", "--no-progress"]
    assert main(["eval", *common, "--checkpoint", str(run.ckpt), "--out", str(tmp_path / "c")]) == 0
    assert main(["eval", *common, "--adapter", str(run.out / "adapter"), "--out", str(tmp_path / "a")]) == 0
    rows = [[json.loads(line) for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in "ca"]
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]] and len(rows[0]) == 5
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ca"]
    assert metrics[0]["metrics"] == metrics[1]["metrics"]
    assert metrics[0]["lora"].endswith(f"checkpoints/{TAG}")
    from lora_ds.eval_model import build_eval_model, lora_tokenizer_dir, read_lora
    from lora_ds.tokenizer import load_tokenizer

    ids = torch.randint(0, VOCAB + 2, (2, 16), generator=torch.Generator().manual_seed(0))
    outputs = []
    for lora in (read_lora(None, str(run.ckpt)), read_lora(str(run.out / "adapter"), None)):
        tok = load_tokenizer(lora_tokenizer_dir(lora))
        model, _, _ = build_eval_model(str(run.base), tok, lora, "fp32", None)
        assert tok.vocab_size == model.get_input_embeddings().weight.shape[0] == VOCAB + 2
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32)(input_ids=ids.clamp(max=VOCAB - 1))
    assert (outputs[0][..., :VOCAB] - base.logits).abs().max() > 1e-3  # the LoRA and the trained head act
