"""Run under `deepspeed --num_gpus 2` by test_train_distributed: reports, per rank, what a live ZeRO-3
engine holds (base partitions, optimizer state) and the step-0 logits against the plain base model."""
import argparse
import json
import os

import torch

from lora_ds.config import parse_config, resolve_ds_config
from lora_ds.dist import init_distributed, shutdown
from lora_ds.engine import build_engine
from lora_ds.lora import inject_lora, lora_parameters
from lora_ds.model import build_model
from lora_ds.zero import full_numel, is_partitioned, local_numel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    cfg = parse_config(["--model", args.model, "--dtype", "fp32", "--micro_batch", "2", "--max_steps", "1"])
    env = init_distributed()
    ds_config = resolve_ds_config(cfg, env.world_size)
    model, keepalive = build_model(args.model, "fp32", ds_config)
    base = {n: p for n, p in model.named_parameters()}
    report = {
        "base_total_numel": sum(full_numel(p) for p in base.values()),
        "base_local_numel": sum(local_numel(p) for p in base.values()),
        "base_expected_partition_numel": sum(-(-full_numel(p) // env.world_size) for p in base.values()),
        "base_params_fully_local": sum(1 for p in base.values() if not is_partitioned(p)),
    }
    inject_lora(model, ["query_key_value"], 4, 8, seed=3)
    lora = lora_parameters(model)
    engine = build_engine(model, list(lora.values()), cfg, ds_config, total_steps=1)
    opt = engine.optimizer
    report.update(
        optimizer_numel=sum(t.numel() for t in opt.fp32_partitioned_groups_flat),
        optimizer_param_count=sum(len(g) for g in opt.fp16_groups),
        lora_param_count=len(lora),
        lora_partition_numel=sum(-(-full_numel(p) // env.world_size) for p in lora.values()),
        trainable_outside_lora=[n for n, p in model.named_parameters()
                                if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n],
    )
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.eval()
    with torch.no_grad():
        ours = engine(input_ids=ids).logits
    del keepalive
    from transformers.integrations import deepspeed as hf_ds

    hf_ds.unset_hf_deepspeed_config()
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
    report["step0_max_abs_diff"] = (ours - reference).abs().max().item()
    with open(os.path.join(args.out, f"probe_rank{env.rank}.json"), "w") as f:
        json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main()
