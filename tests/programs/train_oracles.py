"""launcher/train.py's Recipe on this rank, then what its live ZeRO-3 engine holds: the oracles of
test_export_adapter.

    deepspeed --num_gpus 2 tests/programs/train_oracles.py TRAIN_FLAGS... --oracles DIR [--with_frozen] [--live_merge]

Trains and saves as the trainer does (checkpoints through lora_ds.checkpoint.save, then the final adapter), and
before the engine goes writes into --oracles: live.safetensors (the LoRA params gathered from the engine's
partitions), master.safetensors (their fp32 master copies, DeepSpeed's safe_get_full_fp32_param) and
report_rank<r>.json (with --live_merge: merged_for_eval on the live model, else {}).
--with_frozen has DeepSpeed keep the frozen base fragments in every checkpoint too (as DeepSpeed's own default
does), so that the export can be shown to ignore them; nothing else about the save changes.
"""

import argparse
import json
import os

import torch


def oracle_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--oracles", required=True)
    parser.add_argument("--with_frozen", action="store_true")
    parser.add_argument("--live_merge", action="store_true")
    return parser.parse_known_args(argv)


def keep_frozen_fragments(engine) -> None:
    save = engine.save_checkpoint

    def save_with_frozen(*args, **kwargs):
        return save(*args, **{**kwargs, "exclude_frozen_parameters": False})

    engine.save_checkpoint = save_with_frozen


def live_merge_report(model, vocab: int) -> dict:
    """merged_for_eval on the live ZeRO-3 model: logits, LoRA path skipped, partitions restored bitwise."""
    from lora_ds.lora import lora_modules
    from lora_ds.merge import merged_for_eval

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
        "partitions_restored": all(
            torch.equal(m.base_layer.weight.ds_tensor, before[n]) for n, m in lora_modules(model)
        ),
        "partition_numel": sum(t.numel() for t in before.values()),
    }


def main(argv=None) -> int:
    import deepspeed
    from safetensors.torch import save_file

    from launcher.train import Recipe
    from lora_ds.config import parse_config

    args, train_argv = oracle_args(argv)
    recipe = Recipe(parse_config(train_argv))
    recipe.setup()
    if args.with_frozen:
        keep_frozen_fragments(recipe.engine)
    code = recipe.save(recipe.train())
    lora, model = recipe.trainable.lora, recipe.engine.module
    with deepspeed.zero.GatheredParameters(list(lora.values())):
        live = {name: p.detach().clone() for name, p in lora.items()}
    master = {name: deepspeed.utils.safe_get_full_fp32_param(p).clone() for name, p in lora.items()}
    report = live_merge_report(model, model.config.vocab_size) if args.live_merge else {}
    rank = recipe.env.rank
    os.makedirs(args.oracles, exist_ok=True)
    if rank == 0:
        save_file(live, os.path.join(args.oracles, "live.safetensors"))
        save_file(master, os.path.join(args.oracles, "master.safetensors"))
    with open(os.path.join(args.oracles, f"report_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    recipe.cleanup()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
