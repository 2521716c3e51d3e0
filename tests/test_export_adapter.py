"""`lora-ds export-adapter` on real ZeRO-3 checkpoints of 1, 2 and 3 CPU ranks (gloo).

Oracles: DeepSpeed's own zero_to_fp32 consolidation (restricted to LoRA keys), the live gathered params and
fp32 masters of the engine that wrote the checkpoint, and PEFT loading the exported adapter. Run as a script,
this file is the rank program that trains a tiny model for a few steps and writes such a checkpoint
(it stands in for launcher/train.py, whose checkpoint layout it reproduces).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEMO, REPO, free_port, launch, save_tiny
from lora_ds.adapter import read_adapter
from lora_ds.cli import main
from lora_ds.consolidate import export_adapter
from lora_ds.errors import UserError

R, ALPHA, SEED = 4, 8, 11
TAG = "step_00000002"


def rank_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--with_frozen", action="store_true", help="save the frozen base fragments too")
    parser.add_argument("--live_merge", action="store_true", help="also check merged_for_eval on the engine")
    parser.add_argument("--lora_r", type=int, default=R)
    parser.add_argument("--persistence_threshold", type=int, default=0,
                        help="ZeRO-3 keeps params up to this size gathered (0: every param is partitioned)")
    return parser.parse_args(argv)


def rank_program(argv=None) -> None:
    """One rank: ZeRO-3 engine over LoRA-only params, 2 AdamW steps, checkpoint, then the oracles."""
    import deepspeed
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from lora_ds.adapter import peft_config
    from lora_ds.dist import shutdown
    from lora_ds.fsutil import write_json, write_text
    from lora_ds.lora import inject_lora, lora_parameters

    args = rank_args(argv)

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "train_batch_size": 2 * world, "bf16": {"enabled": args.dtype == "bf16"}, "steps_per_print": 10 ** 9,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": args.persistence_threshold}}
    keepalive = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- makes from_pretrained load straight into partitions
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    targets = args.targets.split(",")
    inject_lora(model, targets, args.lora_r, ALPHA, seed=SEED)
    lora = lora_parameters(model)
    optimizer = torch.optim.AdamW(list(lora.values()), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(lora.values()), optimizer=optimizer,
                                           config=ds_config)
    vocab = model.config.vocab_size
    for step in range(2):
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(100 * step + rank))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    # What lora_ds.checkpoint.save writes: DeepSpeed's files, then (rank 0) the adapter and run configs, the
    # trainer state that seals the tag, and `latest`.
    root = Path(args.root)
    engine.save_checkpoint(str(root), TAG, exclude_frozen_parameters=not args.with_frozen, save_latest=False)
    fan_in_fan_out = any(getattr(m, "fan_in_fan_out", False) for m in model.modules())
    with deepspeed.zero.GatheredParameters(list(lora.values())):
        live = {name: p.detach().clone() for name, p in lora.items()}
    master = {name: deepspeed.utils.safe_get_full_fp32_param(p).clone() for name, p in lora.items()}
    report = {}
    if args.live_merge:
        report = live_merge_report(engine, vocab)
    if rank == 0:
        write_json(root / TAG / "adapter_config.json",
                   peft_config(r=args.lora_r, alpha=ALPHA, dropout=0.0, target_modules=targets, use_rslora=False,
                               fan_in_fan_out=fan_in_fan_out, base_model=args.base))
        write_json(root / TAG / "trainer_state.json", {"step": 2, "world_size": world})
        adapted = sorted({n.rsplit(".lora_", 1)[0] for n in lora})
        write_json(root / TAG / "run_config.json", {"resolved": {"world_size": world, "adapted_modules": adapted}})
        write_text(root / "latest", TAG + "\n")
        save_file(live, root / "live.safetensors")
        save_file(master, root / "master.safetensors")
    write_json(root / f"report_rank{rank}.json", report)
    shutdown()


def live_merge_report(engine, vocab: int) -> dict:
    """merged_for_eval on the live ZeRO-3 model: logits, LoRA path skipped, partitions restored bitwise."""
    from lora_ds.lora import lora_modules
    from lora_ds.merge import merged_for_eval

    model = engine.module
    model.eval()
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))
    before = {n: m.base_layer.weight.ds_tensor.clone() for n, m in lora_modules(model)}
    calls = []
    hooks = [m.lora_A.register_forward_hook(lambda *_: calls.append(1)) for _, m in lora_modules(model)]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        calls.clear()
        with merged_for_eval(model):
            merged = model(input_ids=ids).logits.float()
            lora_calls_merged = len(calls)
        after = model(input_ids=ids).logits.float()
    for h in hooks:
        h.remove()
    return {
        "persistent": [bool(m.base_layer.weight.ds_persist) for _, m in lora_modules(model)],
        "merged_vs_unmerged": (merged - unmerged).abs().max().item(),
        "lora_calls_while_merged": lora_calls_merged,
        "after_equals_before": bool(torch.equal(after, unmerged)),
        "partitions_restored": all(torch.equal(m.base_layer.weight.ds_tensor, before[n])
                                   for n, m in lora_modules(model)),
        "partition_numel": sum(t.numel() for t in before.values()),
    }


# ---------------------------------------------------------------- the tests

pytestmark = pytest.mark.distributed

# world size -> (model type, targets, dtype, extra rank-program flags). Together: 1, 2 and 3 ranks; fp32 and
# bf16 (bf16_-prefixed optimizer files); padded partitions (3 ranks); frozen fragments saved (2 ranks);
# GPT-2's Conv1D; the live merge with every weight partitioned (2) and with every weight persisted (3).
RUNS = {
    1: ("gpt_neox", "query_key_value", "fp32", []),
    2: ("gpt_neox", "query_key_value", "fp32", ["--with_frozen", "--live_merge"]),
    3: ("gpt2", "c_attn", "bf16", ["--live_merge", "--persistence_threshold", str(10 ** 9)]),
}
VOCAB = 512


def start_ranks(world: int, args: list[str], log: Path) -> list[subprocess.Popen]:
    """This file as the rank program on `world` CPU ranks (gloo), with the env torchrun would set."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = open(log.with_suffix(f".rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, env=env, stdout=out,
                                      stderr=subprocess.STDOUT))
        out.close()
    return procs


TRAINER_ARGS = ["--data", str(DEMO / "train.jsonl"), "--max_steps", "3", "--save_every", "3", "--dtype", "fp32",
                "--micro_batch", "2", "--lora_r", "4", "--lora_alpha", "8", "--lr", "1e-2", "--max_len", "64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, neox_dir):
    """{world: (base dir, checkpoints root)} and {"trainer": run dir of launcher/train.py on 2 ranks}, all
    started together: the runs wait on each other's startup and gloo, so together they share the two cores."""
    root = tmp_path_factory.mktemp("export")
    trainer_run = root / "trainer"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        trainer = pool.submit(launch, ["--model", str(neox_dir), "--output_dir", str(trainer_run), *TRAINER_ARGS])
        started = {}
        for world, (model_type, targets, dtype, extra) in RUNS.items():
            base = save_tiny(model_type, VOCAB, root / f"base_w{world}")
            ckpt = root / f"w{world}" / "checkpoints"
            args = ["--base", str(base), "--root", str(ckpt), "--targets", targets, "--dtype", dtype, *extra]
            started[world] = (base, ckpt, start_ranks(world, args, root / f"w{world}"))
        failed = []
        for world, (_, _, procs) in started.items():
            codes = [p.wait(timeout=900) for p in procs]
            if any(codes):
                logs = "\n".join((root / f"w{world}.rank{r}.log").read_text()[-3000:] for r in range(world))
                failed.append(f"{world} ranks: exit codes {codes}\n{logs}")
        trainer.result()  # re-raises the launcher's failure, with its output
    assert not failed, "\n".join(failed)
    return {"trainer": trainer_run, **{world: (base, ckpt) for world, (base, ckpt, _) in started.items()}}


def lora_keys_of_zero_to_fp32(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG, exclude_frozen_parameters=True)
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


@pytest.mark.parametrize("world", sorted(RUNS))
def test_export_equals_zero_to_fp32_and_the_live_engine_params(runs, world, tmp_path):
    from safetensors.torch import load_file

    _, ckpt = runs[world]
    report = export_adapter(str(ckpt), str(tmp_path / "adapter"))
    assert report["world_size"] == world and report["modules"] == 2 and report["params"] == 2 * R * (64 + 192)
    _, ours = read_adapter(str(tmp_path / "adapter"))
    oracle = lora_keys_of_zero_to_fp32(ckpt)
    master, live = load_file(ckpt / "master.safetensors"), load_file(ckpt / "live.safetensors")
    assert sorted(ours) == sorted(oracle) == sorted(master) == sorted(live) and len(ours) == 4
    for name, value in ours.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, oracle[name]), name
        assert torch.equal(value, master[name]), name
        assert torch.equal(value.to(live[name].dtype), live[name]), name
    trained_B = max(v.abs().max().item() for k, v in ours.items() if "lora_B" in k)
    assert trained_B > 1e-3  # two AdamW steps at lr 1e-2 moved B off its zero init


@pytest.mark.parametrize("world", sorted(RUNS))
def test_exported_adapter_loads_in_peft_and_gives_our_logits(runs, world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.lora import inject_lora, lora_parameters

    base, ckpt = runs[world]
    model_type, targets, _, _ = RUNS[world]
    export_adapter(str(ckpt), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (R, ALPHA, [targets])
    assert config["fan_in_fan_out"] is (model_type == "gpt2") and config["base_model_name_or_path"] == str(base)
    assert json.loads((tmp_path / "adapter" / "run_config.json").read_text())["resolved"]["world_size"] == world

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           tmp_path / "adapter").eval()
    ours = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    inject_lora(ours, [targets], R, ALPHA)
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

    _, ckpt = runs[2]
    state = load_pt(str(ckpt / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"), mmap=True)
    fragments = state["frozen_param_fragments"]
    base_numel = sum(math.prod(s) for s in state["frozen_param_shapes"].values())
    assert len(fragments) == len(state["frozen_param_shapes"]) > 20
    assert sum(t.numel() for t in fragments.values()) >= base_numel // 2  # this rank's half of the base
    lora_only = load_pt(str(runs[1][1] / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"), mmap=True)
    assert lora_only["frozen_param_fragments"] is None


@pytest.mark.parametrize("world", [2, 3])
def test_live_zero3_merge_for_eval_gives_lora_logits_and_restores_partitions_bitwise(runs, world):
    _, ckpt = runs[world]
    for rank in range(world):
        report = json.loads((ckpt / f"report_rank{rank}.json").read_text())
        assert report["persistent"] == [world == 3] * 2  # both paths: gathered on demand, and persisted
        assert report["lora_calls_while_merged"] == 0
        # fp32: the same sums in another order; bf16: the merged weight is rounded to bf16 once.
        assert report["merged_vs_unmerged"] < (1e-5 if RUNS[world][2] == "fp32" else 2e-2)
        assert report["after_equals_before"] and report["partitions_restored"]
        assert report["partition_numel"] == 2 * -(-64 * 192 // world)


def test_cli_exports_the_latest_tag_in_bf16(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    _, ckpt = runs[2]
    out = tmp_path / "adapter"
    assert main(["export-adapter", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(ckpt / TAG)
    saved = load_file(out / "adapter_model.safetensors")
    master = load_file(ckpt / "master.safetensors")
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
    shutil.copy(runs[3][1] / TAG / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt", tag_dir)


BROKEN = {
    "missing_rank": (_drop("zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                     r"written by 2 ranks .* holds optimizer files of ranks \[0\] \(missing: rank 1\)"),
    "rank_of_another_run": (_add_rank_of_another_run,
                            r"written by 2 ranks .* holds optimizer files of ranks \[0, 1, 2\]"),
    "no_latest": (lambda tag_dir, runs: (tag_dir.parent / "latest").unlink(),
                  r"no 'latest' file; pass --tag \(tags here: step_00000002\)"),
    "incomplete": (_drop("trainer_state.json"), r"incomplete checkpoint \(no trainer_state.json"),
    "no_adapter_config": (_drop("adapter_config.json"), r"adapter_config.json: missing; the trainer writes"),
    "run_config_not_json": (lambda tag_dir, runs: (tag_dir / "run_config.json").write_text('{"resolved": '),
                            r"run_config.json: not valid JSON"),
    "wrong_r": (_edit_json("adapter_config.json", r=8), r"lora_A \[4, 64\] .* says r = 8"),
    "wrong_targets": (_edit_json("adapter_config.json", target_modules=["dense"]),
                      r"not selected by target_modules \['dense'\]"),
    "module_lost": (_edit_json("run_config.json", adapted_modules=["gpt_neox.layers.0.attention.query_key_value",
                                                                   "gpt_neox.layers.1.attention.query_key_value",
                                                                   "gpt_neox.layers.2.attention.query_key_value"]),
                    r"lists 3 adapted modules but the checkpoint holds LoRA for 2 \(not found: "
                    r"gpt_neox.layers.2.attention.query_key_value\)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_refused_with_a_clear_message(runs, case, tmp_path, capsys):
    break_it, message = BROKEN[case]
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(runs[2][1], ckpt)
    break_it(ckpt / TAG, runs)
    out = tmp_path / "adapter"
    with pytest.raises(UserError, match=message):
        export_adapter(str(ckpt), str(out))
    assert main(["export-adapter", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "lora-ds export-adapter: error:" in capsys.readouterr().err
    assert not out.exists()


def test_export_and_merge_work_on_the_trainer_checkpoint(runs, neox_dir, tmp_path):
    """The real recipe (launcher/train.py, 2 ranks) on the demo data: the exported adapter is the trainer's
    own final adapter bit for bit, and it merges into the base with --verify."""
    run = runs["trainer"]
    assert main(["export-adapter", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "exported")]) == 0
    config, exported = read_adapter(str(tmp_path / "exported"))
    trainer_config, trained = read_adapter(str(run / "adapter"))
    assert config == trainer_config and sorted(exported) == sorted(trained) and len(trained) == 4
    for name in trained:
        assert torch.equal(exported[name], trained[name]), name
    assert main(["merge", "--base", str(neox_dir), "--adapter", str(tmp_path / "exported"), "--out",
                 str(tmp_path / "merged"), "--verify"]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

if __name__ == "__main__":
    rank_program()
