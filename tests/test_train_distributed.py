"""Real 2-rank ZeRO-3 runs of launcher/train.py on CPU (gloo), checked against a plain-PyTorch reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import save_tiny, write_fixture
from helpers import (
    DEMO_TOKENIZER,
    EVAL_DATA,
    PROGRAMS,
    REPO,
    ZERO3,
    adapter_tensors,
    as_tensorboard,
    assert_close_tensors,
    assert_equal_tensors,
    ds_config_file,
    fork_trainer,
    launch,
    read_metrics,
    read_reports,
    reference_lora,
    run_cli,
    tensorboard_scalars,
    train_args,
)

from lora_ds.tokenizer import load_tokenizer

pytestmark = pytest.mark.distributed

# The reference's setup as flags: micro 4 x accum 2 x 2 ranks, warm-up 2, seed 7.
COMMON = dict(
    eval_data=EVAL_DATA,
    micro_batch=4,
    grad_accum=2,
    lora_r=4,
    lora_alpha=8,
    lr=1e-2,
    warmup=2,
    max_grad_norm=1.0,
    seed=7,
    max_len=128,
)
STEPS = 8
# Adam divides by sqrt(v): for elements whose gradient is near zero it amplifies fp32 summation-order noise
# (2 ranks reduce in another order than 1 process) to ~1e-5 after a few steps at lr 1e-2.
ATOL = 3e-5


def reference(
    model_dir, targets, steps: int, grad_norms: list | None = None, attention: str = "sdpa", **variant
) -> dict:
    """COMMON's training of `model_dir` for `steps` steps, in one process with plain PyTorch; `variant`: more
    reference_lora settings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    tok = load_tokenizer(str(model_dir))
    return reference_lora(
        model,
        tok,
        targets,
        steps=range(steps),
        world=2,
        micro=4,
        accum=2,
        warmup=2,
        seed=7,
        grad_norms=grad_norms,
        **variant,
    )


@pytest.fixture(scope="module")
def neox_run(neox_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("neox_run")
    done = launch(
        train_args(neox_dir, out, max_steps=STEPS, save_every=4, eval_every=4, report_to="tensorboard", **COMMON)
    )
    (out / "shm_leftovers.json").write_text(json.dumps(done.shm_leftovers))
    return out


def test_a_cpu_run_leaves_no_shared_memory_behind(neox_run):
    """DeepSpeed's CPU all-reduce buffers (66 MB per rank) are unlinked once every rank has mapped them."""
    assert json.loads((neox_run / "shm_leftovers.json").read_text()) == []


def test_zero3_two_ranks_match_single_process_reference_and_its_gradient_norms(neox_run, neox_dir):
    ours = adapter_tensors(neox_run / "adapter")
    grad_norms = []
    ref = reference(neox_dir, ["query_key_value"], STEPS, grad_norms)
    assert_close_tensors(ours, ref, rtol=1e-4, atol=ATOL)
    # metrics.jsonl's grad_norm: each step's global norm before clipping, as one process computes it.
    assert [r["grad_norm"] for r in read_metrics(neox_run)] == pytest.approx(grad_norms, rel=1e-5)
    moved = max((ref[n] - v).abs().max().item() for n, v in ours.items() if n.endswith("lora_B.weight"))
    assert moved < 1e-4
    assert max(v.abs().max().item() for n, v in ours.items() if n.endswith("lora_B.weight")) > 1e-3


def test_loss_falls_and_metrics_are_logged(neox_run):
    records = read_metrics(neox_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert set(r) >= {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "peak_mem_gib"}
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.2, (first, last)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert records[-1]["lr"] == 0.0


def test_tensorboard_event_files_hold_the_metrics_records(neox_run):
    """--report_to tensorboard: every number of metrics.jsonl at its step, read by TensorBoard's own reader."""
    records = read_metrics(neox_run)
    scalars = tensorboard_scalars(neox_run)
    assert scalars == as_tensorboard(records)
    assert [step for step, _ in scalars["train/grad_norm"]] == list(range(1, STEPS + 1))
    assert [step for step, _ in scalars["eval/loss"]] == [4, 8]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/peak_mem_gib", "train/skipped_steps"} <= set(scalars)


def test_checkpoint_holds_lora_state_only(neox_run, neox_dir):
    ckpt = neox_run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:08d}"
    tag_dir = ckpt / f"step_{STEPS:08d}"
    ckpt_bytes = sum(f.stat().st_size for f in tag_dir.iterdir())
    base_bytes = sum(f.stat().st_size for f in neox_dir.glob("*.safetensors"))
    lora_numel = sum(v.numel() for v in adapter_tensors(neox_run / "adapter").values())
    # fp32 master + two Adam moments = 12 bytes per LoRA param, plus a fixed overhead of pickled metadata.
    assert ckpt_bytes < 12 * lora_numel + 64 * 1024, (ckpt_bytes, lora_numel)
    assert ckpt_bytes < base_bytes / 10, (ckpt_bytes, base_bytes)
    # The optimizer state: per rank, flat fp32 partitions of exactly the LoRA params (ceil(numel/world) each).
    per_rank = 0
    for rank in range(2):
        optim = torch.load(
            tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False, map_location="cpu"
        )["optimizer_state_dict"]
        flat = optim["fp32_flat_groups"]
        state = optim["optimizer_state_dict"]["state"]
        assert len(flat) == 1 and len(state) == 1
        per_rank += flat[0].numel()
        for moment in ("exp_avg", "exp_avg_sq"):
            assert state[0][moment].numel() == flat[0].numel()
    expected = sum(-(-v.numel() // 2) for v in adapter_tensors(neox_run / "adapter").values())
    assert per_rank == 2 * expected
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_00000004", "step_00000008"]


def test_adapter_is_peft_format_and_gives_our_logits(neox_run, neox_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.lora import inject_lora, lora_parameters

    config = json.loads((neox_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["query_key_value"] and config["fan_in_fan_out"] is False
    run_config = json.loads((neox_run / "run_config.json").read_text())
    assert run_config["lora"]["r"] == 4 and run_config["resolved"]["world_size"] == 2
    assert run_config["resolved"]["ds_config"]["train_batch_size"] == 16

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32)
    peft_logits = PeftModel.from_pretrained(base, neox_run / "adapter").eval()(input_ids=ids).logits
    ours = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32)
    inject_lora(ours, ["query_key_value"], 4, 8)
    params = lora_parameters(ours)
    with torch.no_grad():
        for name, value in adapter_tensors(neox_run / "adapter").items():
            params[name].copy_(value)
    torch.testing.assert_close(ours.eval()(input_ids=ids).logits, peft_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        # ZeRO++ hpZ (a second shard of the frozen base per node; "auto" = 2 ranks on this host)
        dict(ds_config=str(REPO / "ds_configs" / "zero3_multinode.json")),
        # a hook per Linear/norm instead of one ZeRO-3 fetch unit per decoder layer
        dict(zero3_fetch="module"),
        # no weight persists: each is gathered for its layer and released after it, in forward and in backward
        # (torch's own F.linear, as zero3.json keeps it: memory_efficient_linear false)
        dict(zero_optimization=dict(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0)),
    ],
    ids=["zero3_multinode.json", "zero3_fetch module", "no persistent weights"],
)
def test_zero3_variants_train_to_the_same_adapter(neox_run, neox_dir, tmp_path, variant):
    if "zero_optimization" in variant:
        zero = ZERO3["zero_optimization"] | variant.pop("zero_optimization")
        variant["ds_config"] = ds_config_file(tmp_path / "ds_config.json", zero_optimization=zero)
    launch(train_args(neox_dir, tmp_path, max_steps=STEPS, save_every=4, eval_every=4, **COMMON, **variant))
    assert_equal_tensors(adapter_tensors(tmp_path / "adapter"), adapter_tensors(neox_run / "adapter"))
    resolved = json.loads((tmp_path / "run_config.json").read_text())["resolved"]["ds_config"]["zero_optimization"]
    assert resolved.get("zero_hpz_partition_size", 1) == (2 if "multinode" in variant.get("ds_config", "") else 1)
    assert resolved["memory_efficient_linear"] is False


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(neox_dir, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = dict(max_steps=6, lora_dropout=0.1, save_every=100, report_to="tensorboard", **COMMON)
    launch(train_args(neox_dir, whole, **args))
    halted = launch(train_args(neox_dir, parts, halt_at_step=3, **args))
    assert (parts / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (parts / "adapter").exists()
    assert "rerun the same command to resume" in halted.stdout
    resumed = launch(train_args(neox_dir, parts, **args))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert_equal_tensors(adapter_tensors(parts / "adapter"), adapter_tensors(whole / "adapter"))
    assert [r["step"] for r in read_metrics(parts)] == [1, 2, 3, 4, 5, 6]
    # The halted run (stopped as a preemption stops) closed its event file; the resumed run wrote a second one.
    assert tensorboard_scalars(parts) == as_tensorboard(read_metrics(parts))
    assert len(list((parts / "tensorboard").glob("events.out.tfevents.*"))) == 2


# #17's variants in one run: layer 0's QKV at rank 8 (the rest at COMMON's 4), layer 1's alpha 2, LoRA+ (B at 4 × lr),
# and PiSSA (training on the residual base, which each start and resume writes into the ZeRO-3 partitions).
RANK_PATTERN, ALPHA_PATTERN = {r"layers\.0\.attention\.query_key_value": 8}, {r"layers\.1\..*": 2.0}
VARIANTS = dict(
    lora_rank_pattern=",".join(f"{k}={v}" for k, v in RANK_PATTERN.items()),
    lora_alpha_pattern=",".join(f"{k}={v}" for k, v in ALPHA_PATTERN.items()),
    loraplus_lr_ratio=4,
    init_lora_weights="pissa",
)


def test_rank_alpha_patterns_loraplus_and_pissa_train_resume_bitwise_export_and_load_in_peft(neox_dir, tmp_path):
    """Trained on 2 ranks, halted and resumed (bitwise the uninterrupted run, the single-process reference's
    result), exported from the 2-rank checkpoint (the trainer's adapter: PiSSA's converted to a rank-2r LoRA of the
    original base), loaded by PEFT on the original base (our logits) and merged (PEFT's merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import inject_adapter, to_original_base
    from lora_ds.checkpoint_files import load_pt
    from lora_ds.lora import lora_parameters

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = dict(COMMON, max_steps=6, save_every=100, **VARIANTS)
    launch(train_args(neox_dir, whole, **args))
    launch(train_args(neox_dir, parts, halt_at_step=3, **args))
    resumed = launch(train_args(neox_dir, parts, **args))
    assert "at step 3" in resumed.stdout
    ours = adapter_tensors(whole / "adapter")
    assert_equal_tensors(adapter_tensors(parts / "adapter"), ours)  # the recomputed residual base and A0, B0 too
    A = "gpt_neox.layers.{}.attention.query_key_value.lora_A.weight"
    assert (ours[A.format(0)].shape, ours[A.format(1)].shape) == ((16, 64), (8, 64))  # [A ; A0] at 2r
    tag_dir = parts / "checkpoints" / "step_00000006"
    tag_config = json.loads((tag_dir / "adapter_config.json").read_text())
    assert (tag_config["init_lora_weights"], tag_config["r"]) == ("pissa", 4)

    def as_saved(trained: dict) -> dict:
        """The reference's factors as the trainer saves them: converted with the reference's own A0, B0."""
        return to_original_base(trained, tag_config, init)[0]

    patterns = dict(rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, init_lora_weights="pissa")
    init = reference(neox_dir, ["query_key_value"], 0, **patterns)
    ref = reference(neox_dir, ["query_key_value"], 6, loraplus_lr_ratio=4.0, **patterns)
    # This process's SVD of W0 (other threads than a rank's) differs from rank 0's by ~5e-6; Adam makes it ~5e-5.
    assert_close_tensors(ours, as_saved(ref), rtol=1e-4, atol=1e-4)
    plain = as_saved(reference(neox_dir, ["query_key_value"], 6, **patterns))
    assert max((plain[n] - v).abs().max().item() for n, v in ours.items()) > 1e-3  # LoRA+ changed the result
    # The optimizer's two groups and their lrs, as the resumed run saved them at its end (the schedule's 0).
    optim = load_pt(str(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))["optimizer_state_dict"]
    assert len(optim["fp32_flat_groups"]) == 2
    scheduler = load_pt(str(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"))["lr_scheduler"]
    assert scheduler["base_lrs"] == [1e-2, 4e-2]
    records = read_metrics(parts)
    assert [r["lr_B"] for r in records] == pytest.approx([4 * r["lr"] for r in records]) and records[0]["lr"] > 0
    # Resuming with another ratio would keep the checkpoint's groups, with another init another base: refused
    # before any rank starts.
    for flag, value, message in (
        ("loraplus_lr_ratio", 8, "--loraplus_lr_ratio 4.0, this run gives 8.0"),
        ("init_lora_weights", "olora", "--init_lora_weights 'pissa', this run gives 'olora'"),
    ):
        code, output = fork_trainer(train_args(neox_dir, parts, **{**args, flag: value}), tmp_path / f"{flag}.log")
        assert code == 2 and f"was trained with {message}" in output

    exported = run_cli("export-adapter", "--checkpoint", parts / "checkpoints", "--out", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr
    assert_equal_tensors(adapter_tensors(tmp_path / "exported"), ours)
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config == json.loads((whole / "adapter" / "adapter_config.json").read_text())
    doubled = ({k: 2 * v for k, v in RANK_PATTERN.items()}, {k: 2 * v for k, v in ALPHA_PATTERN.items()}, 8, 16.0)
    assert (config["rank_pattern"], config["alpha_pattern"], config["r"], config["lora_alpha"]) == doubled
    assert config["init_lora_weights"] is True

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32), tmp_path / "exported"
    ).eval()
    model = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32).eval()
    inject_adapter(model, config)
    params = lora_parameters(model)
    with torch.no_grad():
        for name, value in ours.items():
            params[name].copy_(value)
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(expected, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
        # ... which are the trained residual model's: its own factors (the first r of the 2r) on W0 - s·B0·A0.
        trained = {n: v[: len(v) // 2] if "lora_A" in n else v[:, : v.shape[1] // 2] for n, v in ours.items()}
        residual = reference_model(AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32), trained)
        torch.testing.assert_close(residual(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
    merged = run_cli("merge", "--base", neox_dir, "--adapter", tmp_path / "exported", "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    oracle = peft_model.merge_and_unload().state_dict()
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert sorted(state) == sorted(oracle)
    for key, value in state.items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)


def reference_model(model, trained: dict):
    """`model` with inject_lora's PiSSA LoRA of COMMON's rank and alpha and VARIANTS' patterns (on its residual base),
    its factors set to `trained`."""
    from lora_ds.lora import inject_lora, lora_parameters

    patterns = dict(rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, init_lora_weights="pissa")
    inject_lora(model, ["query_key_value"], 4, 8, **patterns)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            p.copy_(trained[name])
    return model.eval()


def test_dora_trains_to_peft_s_dora_resumes_bitwise_and_exports_its_adapter(neox_dir, tmp_path):
    """--use_dora on 2 ranks: PEFT's own DoRA in one process is the reference; a halted and resumed run equals the
    uninterrupted one bit for bit; export-adapter of its 2-rank checkpoint is its own adapter."""
    from lora_ds.consolidate import export_adapter

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = dict(max_steps=4, save_every=4, use_dora=True, **COMMON)
    launch(train_args(neox_dir, whole, **args))
    launch(train_args(neox_dir, parts, halt_at_step=2, **args))
    assert "at step 2" in launch(train_args(neox_dir, parts, **args)).stdout
    ours = adapter_tensors(whole / "adapter")
    assert_equal_tensors(adapter_tensors(parts / "adapter"), ours)
    assert json.loads((whole / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert sum(n.endswith(".lora_magnitude_vector") for n in ours) == 2  # the tiny model's two layers
    ref = reference(neox_dir, ["query_key_value"], 4, use_dora=True)
    assert_close_tensors(ours, ref, rtol=1e-4, atol=ATOL)
    moved = max((v - ref[n]).abs().max().item() for n, v in ours.items() if n.endswith("magnitude_vector"))
    assert moved < 1e-4
    init = reference(neox_dir, ["query_key_value"], 0, use_dora=True)
    assert max((v - init[n]).abs().max().item() for n, v in ours.items() if n.endswith("magnitude_vector")) > 1e-3
    export_adapter(str(whole / "checkpoints"), str(tmp_path / "exported"))
    assert_equal_tensors(adapter_tensors(tmp_path / "exported"), ours)


def test_llama_with_sentencepiece_tokenizer_matches_reference(llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    launch(train_args(llama_dir, tmp_path, max_steps=4, **COMMON))
    ours = adapter_tensors(tmp_path / "adapter")
    assert sorted({k.split(".")[-3] for k in ours}) == ["q_proj", "v_proj"]
    assert_close_tensors(ours, reference(llama_dir, ["q_proj", "v_proj"], 4), rtol=1e-4, atol=ATOL)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    before = base(input_ids=ids).logits
    after = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-4


def test_zero3_partitions_base_and_optimizes_only_lora(neox_dir, tmp_path):
    """Inside a live 2-rank engine built by lora_ds.build: no rank holds the whole base, and step 0 equals the base
    model."""
    launch(["--model", neox_dir, "--out", tmp_path], program=PROGRAMS / "zero3_probe.py", timeout=600)
    for report in read_reports(tmp_path, "probe", 2):
        assert report["base_params_fully_local"] == 0
        assert report["base_local_numel"] == report["base_expected_partition_numel"]
        assert report["base_local_numel"] < report["base_total_numel"] / 1.9
        assert report["optimizer_numel"] == report["lora_partition_numel"]
        assert report["optimizer_param_count"] == report["lora_param_count"]
        assert report["trainable_outside_lora"] == []
        assert report["step0_max_abs_diff"] == 0.0


def test_training_reads_packed_prepared_dirs_of_chat_and_of_a_task_in_bf16(neox_dir, tmp_path):
    """lora-ds prep output (packed rows, block-causal masks) trains on 2 ranks in bf16: multi-turn chat data
    (the alpaca template, as the tiny model's tokenizer has none) to train on, SAMSum to evaluate on."""
    prepared = {"chat": tmp_path / "chat", "samsum": tmp_path / "samsum"}
    for task, fixture in (("chat", "chat-sharegpt-jsonl"), ("samsum", "samsum-corpus")):
        src = write_fixture(fixture, tmp_path / fixture, n=60)
        template = ["--template", "alpaca"] if task == "chat" else []
        prep = run_cli(
            "prep",
            task,
            "--src",
            *src,
            "--tokenizer",
            neox_dir,
            "--out",
            prepared[task],
            "--pack",
            "256",
            "--max-len",
            "256",
            *template,
        )
        assert prep.returncode == 0, prep.stderr
        assert json.loads((prepared[task] / "manifest.json").read_text())["pack"] == 256
    out = tmp_path / "run"
    launch(
        train_args(
            neox_dir,
            out,
            data=prepared["chat"],
            eval_data=prepared["samsum"],
            max_steps=2,
            micro_batch=1,
            dtype="bf16",
            lora_r=4,
        )
    )
    records = read_metrics(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert math.isfinite(records[-1]["eval_loss"]) and (out / "adapter" / "adapter_model.safetensors").exists()


# Today's families on their tiny presets, each with its default targets, Phi-3 with all-linear (every Linear but the
# output head, its fused qkv_proj and gate_up_proj among them), Gemma's soft-cap small enough to act (test_families).
FAMILY_RUNS = {
    "llama3": dict(),
    "qwen2": dict(),
    "qwen3": dict(),
    "mistral": dict(),
    "gemma2": dict(final_logit_softcapping=0.5),
    "gemma3": dict(final_logit_softcapping=0.5),
    "phi3": dict(lora_targets="all-linear"),
}
FAMILY_STEPS = 2


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{family: (its tiny model dir, its run's --output_dir)}: FAMILY_STEPS steps of each on 2 ranks, one launch."""
    root = tmp_path_factory.mktemp("families")
    runs, argvs = {}, []
    for name, settings in FAMILY_RUNS.items():
        overrides = {k: v for k, v in settings.items() if k != "lora_targets"}
        model_dir = save_tiny(name, 512, root / f"{name}_base", tokenizer=DEMO_TOKENIZER, **overrides)
        runs[name] = (model_dir, root / name)
        flags = dict(COMMON, eval_data="", lora_targets=settings.get("lora_targets"))
        argvs.append(train_args(model_dir, root / name, max_steps=FAMILY_STEPS, **flags))
    (root / "runs.json").write_text(json.dumps(argvs))
    launch(["--runs", root / "runs.json"], program=PROGRAMS / "train_families.py")
    return runs


@pytest.mark.parametrize("name", sorted(FAMILY_RUNS))
def test_each_family_trains_on_two_ranks_to_the_reference_and_loads_in_peft(family_runs, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.lora import inject_lora, lora_parameters

    model_dir, out = family_runs[name]
    targets = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    resolved = json.loads((out / "run_config.json").read_text())["resolved"]
    assert resolved["lora_targets"] == targets and "lm_head" not in targets
    assert resolved["attn_implementation"] == ("eager" if name == "gemma2" else "sdpa")
    ours = adapter_tensors(out / "adapter")
    assert_close_tensors(
        ours, reference(model_dir, targets, FAMILY_STEPS, attention=resolved["attn_implementation"]), 1e-4, ATOL
    )
    assert max(v.abs().max().item() for n, v in ours.items() if n.endswith("lora_B.weight")) > 1e-3

    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inject_lora(model, targets, 4, 8)
    params = lora_parameters(model)
    with torch.no_grad():
        for param_name, value in ours.items():
            params[param_name].copy_(value)
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=1e-5
        )


def test_add_tokens_trains_embedding_and_head_in_full_resumes_bitwise_exports_and_merges_as_peft(neox_dir, tmp_path):
    """--add_tokens (2 tokens the data uses) with --modules_to_save lm_head on 2 ranks: the vocab grows to 514 rows
    (embed_in added to modules_to_save), the run equals the single-process reference and resumes bitwise,
    export-adapter of its 2-rank checkpoint is its adapter (with the tokenizer), PEFT on the resized base gives our
    logits, and lora-ds merge equals PEFT's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ds.adapter import read_adapter
    from lora_ds.vocab import extend_tokenizer, grow_vocab

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("SELECT\nWHERE\n")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = dict(COMMON, max_steps=4, save_every=100, add_tokens=tokens, modules_to_save="lm_head")
    started = launch(train_args(neox_dir, whole, **args))
    assert "--add_tokens: embed_in trained in full" in started.stdout
    launch(train_args(neox_dir, parts, halt_at_step=2, **args))
    assert "at step 2" in launch(train_args(neox_dir, parts, **args)).stdout
    ours = adapter_tensors(whole / "adapter")
    assert_equal_tensors(adapter_tensors(parts / "adapter"), ours)
    assert ours["lm_head.weight"].shape == ours["gpt_neox.embed_in.weight"].shape == (514, 64)
    config, _ = read_adapter(str(whole / "adapter"))
    assert config["modules_to_save"] == ["lm_head", "embed_in"]
    assert len(AutoTokenizer.from_pretrained(whole / "adapter")) == 514

    tok, _, first = extend_tokenizer(str(neox_dir), str(tokens))
    model = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32, attn_implementation="sdpa")
    grow_vocab(model, tok.vocab_size, first)
    initial = model.get_input_embeddings().weight[512:].detach().clone()
    ref = reference_lora(
        model, tok, ["query_key_value"], steps=range(4), world=2, micro=4, accum=2, warmup=2, seed=7,
        modules_to_save=["lm_head", "embed_in"],
    )  # fmt: skip
    assert_close_tensors(ours, ref, rtol=1e-4, atol=ATOL)
    assert (ours["gpt_neox.embed_in.weight"][512:] - initial).abs().max() > 1e-3  # the new rows learned

    exported = run_cli("export-adapter", "--checkpoint", whole / "checkpoints", "--out", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr
    assert_equal_tensors(adapter_tensors(tmp_path / "exported"), ours)
    assert (tmp_path / "exported" / "tokenizer.json").read_text() == (whole / "adapter" / "tokenizer.json").read_text()

    # PEFT needs the base resized first (its rows then hold the adapter's values: modules_to_save replaces them).
    base = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32)
    base.resize_token_embeddings(514)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "exported").eval()
    assert_peft_logits_and_merge(neox_dir, tmp_path / "exported", ours, peft_model, 514, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 514
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == 514


def assert_peft_logits_and_merge(model_dir, adapter, ours, peft_model, vocab, out):
    """The base with `ours` (LoRA and modules trained in full, as `adapter` holds them) gives `peft_model`'s
    logits, and `lora-ds merge` of `adapter` into `model_dir` writes to `out` PEFT's merge_and_unload. Returns
    the merged model."""
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import inject_adapter, read_adapter
    from lora_ds.lora import lora_parameters
    from lora_ds.merge import load_saved_modules

    mine = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_saved_modules(mine, {k: v for k, v in ours.items() if "lora" not in k})
    inject_adapter(mine, read_adapter(str(adapter))[0])
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in lora_parameters(mine).items():
            p.copy_(ours[name])
        torch.testing.assert_close(mine(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    merged = run_cli("merge", "--base", model_dir, "--adapter", adapter, "--out", out)
    assert merged.returncode == 0, merged.stderr
    oracle = peft_model.merge_and_unload().state_dict()
    result = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = result.state_dict()
    assert sorted(state) == sorted(oracle)
    for key, value in state.items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
    return result


def test_a_tied_embedding_trained_in_full_stays_one_matrix_on_two_ranks_loads_in_peft_and_merges_as_peft(tmp_path):
    """Llama 3.2's tied head (tiny llama3) with --modules_to_save embed_tokens on 2 ranks: the one shared matrix
    trains to the single-process reference, is saved under both names (PEFT's ensure_weight_tying), PEFT gives our
    logits, and lora-ds merge equals PEFT's merge_and_unload with the head still tied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import read_adapter

    model_dir = save_tiny("llama3", 512, tmp_path / "base", tokenizer=DEMO_TOKENIZER)
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"]
    out = tmp_path / "run"
    launch(train_args(model_dir, out, max_steps=2, **dict(COMMON, eval_data="", modules_to_save="embed_tokens")))
    ours = adapter_tensors(out / "adapter")
    assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    config, _ = read_adapter(str(out / "adapter"))
    assert config["ensure_weight_tying"] and config["modules_to_save"] == ["embed_tokens"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    initial = model.get_input_embeddings().weight.detach().clone()
    ref = reference_lora(
        model, load_tokenizer(str(model_dir)), ["q_proj", "v_proj"], steps=range(2), world=2, micro=4, accum=2,
        warmup=2, seed=7, modules_to_save=["embed_tokens"],
    )  # fmt: skip
    assert sorted(ref) == sorted(k for k in ours if k != "lm_head.weight")  # the tied matrix is one parameter
    assert_close_tensors({k: ours[k] for k in ref}, ref, rtol=1e-4, atol=ATOL)
    assert (ours["model.embed_tokens.weight"] - initial).abs().max() > 1e-3

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out / "adapter"
    ).eval()
    result = assert_peft_logits_and_merge(model_dir, out / "adapter", ours, peft_model, 512, tmp_path / "merged")
    assert result.get_output_embeddings().weight is result.get_input_embeddings().weight
