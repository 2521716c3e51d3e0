"""What a live ZeRO-3 engine built by lora_ds.build holds, per rank: base partitions, optimizer state, and the
step-0 logits against the plain base model. Writes OUT/probe_rank<r>.json.

    deepspeed --num_gpus 2 tests/programs/zero3_probe.py --model MODEL_DIR --out OUT   (test_train_distributed)
    ... --quantize nf4: the base in 4-bit; step 0 then equals transformers' 4-bit load   (test_qlora)
"""

import argparse
import json
import os

import torch

from lora_ds.build import build
from lora_ds.config import parse_config, resolve_ds_config
from lora_ds.dist import init_distributed, shutdown
from lora_ds.zero import full_numel, is_partitioned, local_numel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("--quantize")
    args = parser.parse_args()
    cfg = parse_config(
        [
            "--model",
            args.model,
            "--dtype",
            "fp32",
            "--micro_batch",
            "2",
            "--max_steps",
            "1",
            "--lora_targets",
            "query_key_value",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--seed",
            "3",
            *(["--quantize", args.quantize] if args.quantize else []),
        ]
    )
    env = init_distributed()
    trainable, engine = build(cfg, resolve_ds_config(cfg, env.world_size), total_steps=1)
    lora = trainable.lora
    base = {n: p for n, p in trainable.model.named_parameters() if n not in lora}
    opt = engine.optimizer
    report = {
        "base_total_numel": sum(full_numel(p) for p in base.values()),
        "base_local_numel": sum(local_numel(p) for p in base.values()),
        "base_expected_partition_numel": sum(-(-full_numel(p) // env.world_size) for p in base.values()),
        "base_params_fully_local": sum(1 for p in base.values() if not is_partitioned(p)),
        "optimizer_numel": sum(t.numel() for t in opt.fp32_partitioned_groups_flat),
        "optimizer_param_count": sum(len(g) for g in opt.fp16_groups),
        "lora_param_count": len(lora),
        "quantized_params": sum(1 for p in base.values() if getattr(p, "quant_state", None) is not None),
        "lora_partition_numel": sum(-(-full_numel(p) // env.world_size) for p in lora.values()),
        "trainable_outside_lora": [
            n for n, p in trainable.model.named_parameters() if p.requires_grad and n not in lora
        ],
    }
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.eval()
    with torch.no_grad():
        ours = engine(input_ids=ids).logits
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_ds

    trainable.keepalive = None
    hf_ds.unset_hf_deepspeed_config()
    quantization = {}
    if args.quantize:
        from lora_ds.quantize import bnb_config

        quantization = dict(quantization_config=bnb_config(torch.float32), device_map={"": "cpu"})
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **quantization).eval()
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
    report["step0_max_abs_diff"] = (ours - reference).abs().max().item()
    with open(os.path.join(args.out, f"probe_rank{env.rank}.json"), "w") as f:
        json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main()
