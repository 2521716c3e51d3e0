"""Each fused path against the plain one on the GPU: loss and LoRA gradients at step 0 (and a trained head's), bf16.

    python bench/device_check.py OUT.jsonl [NAME...]   # a JSON line per model family (NAMEs only), one for packing

A model of each family (a few layers of the real width, random weights, LoRA B drawn non-zero so that every
factor gets a gradient) computes the loss of one batch and its LoRA gradients on the plain path, then again
after lora_ds.kernels.fuse and with Liger's fused LM-head loss. Relative differences ||fused - plain|| / ||plain||
are measured against an fp32 run of the plain path: the fused bf16 path must be as close to it as the plain
bf16 path is (both are bf16 roundings of one function), and its loss within 1e-3 of the plain loss.
Packed rows are checked the same way: FlexAttention with its mask from position ids against SDPA with the dense
block-causal mask (FlexAttention has no backward on CPU, so CI checks only its forward).
"""

from __future__ import annotations

import json
import sys

import torch

FAMILIES = {
    "llama-3": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
            rope_theta=500000.0,
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "gpt-neox": (
        "gpt_neox",
        dict(
            hidden_size=4096,
            num_hidden_layers=2,
            num_attention_heads=32,
            intermediate_size=16384,
            vocab_size=50432,
            rotary_pct=0.25,
        ),
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ),
    "qwen2": (
        "qwen2",
        dict(
            hidden_size=2048,
            num_hidden_layers=2,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=11008,
            vocab_size=151936,
        ),
        ["q_proj", "v_proj"],
    ),
    # GeGLU, (1 + w) RMSNorms, no SDPA (attention auto: FlexAttention) and the final soft-cap, small enough to act on
    # the logits of random weights (the published 30 would not).
    "gemma-2": (
        "gemma2",
        dict(
            hidden_size=3584,
            num_hidden_layers=2,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            intermediate_size=14336,
            vocab_size=256000,
            query_pre_attn_scalar=256,
            final_logit_softcapping=1.0,
        ),
        ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    # the fused qkv_proj and gate_up_proj (Liger's Phi-3 SwiGLU)
    "phi-3": (
        "phi3",
        dict(
            hidden_size=3072,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=8192,
            vocab_size=32064,
            pad_token_id=32000,
        ),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
}


# Also checked with the output head trained in full (--modules_to_save lm_head): Liger's fused loss then gives the
# head's weight gradient too.
TRAINED_HEAD = {"llama-3+lm_head": "llama-3"}


def loss_and_grads(model, batch):
    from lora_ds.loss import lm_loss

    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in trained.values():
        p.grad = None
    loss, _ = lm_loss(model, batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in trained.items()}


def check(name: str, model_type: str, kwargs: dict, targets: list[str], train_head: bool = False) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ds.kernels import fuse
    from lora_ds.lora import inject_lora, lora_modules
    from lora_ds.loss import defer_lm_head
    from lora_ds.model import attention_implementation
    from lora_ds.saved_modules import select, unfreeze

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    attention = attention_implementation("auto", config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention)
    adapted = inject_lora(model, targets, 16, 32.0, seed=0)
    if train_head:
        unfreeze(model, select(model, ["lm_head"], adapted))
    model.cuda()
    for _, layer in lora_modules(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    head = defer_lm_head(model)
    ids = torch.randint(0, config.vocab_size, (2, 1024), device="cuda")
    labels = ids.clone()
    labels[:, :100] = -100
    batch = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(1024, device="cuda").expand(2, -1),
    }
    ref_loss, ref = loss_and_grads(model.float(), batch)  # fp32: what both bf16 paths approximate
    model.to(torch.bfloat16)
    plain_loss, plain = loss_and_grads(model, batch)
    fused_paths = fuse(model)
    head.fused = True
    fused_loss, fused = loss_and_grads(model, batch)

    def errors(grads):
        return {n: ((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}

    plain_err, fused_err = errors(plain), errors(fused)
    result = {
        "kind": "device_check",
        "family": name,
        "fused": fused_paths + ["linear_cross_entropy"],
        "loss_fp32": ref_loss.item(),
        "loss_plain": plain_loss.item(),
        "loss_fused": fused_loss.item(),
        "loss_rel_diff": abs(fused_loss.item() - plain_loss.item()) / abs(plain_loss.item()),
        "grad_err_vs_fp32_plain_max": max(plain_err.values()),
        "grad_err_vs_fp32_fused_max": max(fused_err.values()),
        "grad_err_vs_fp32_plain_median": sorted(plain_err.values())[len(ref) // 2],
        "grad_err_vs_fp32_fused_median": sorted(fused_err.values())[len(ref) // 2],
        "grad_rel_diff_fused_vs_plain_max": max(((fused[n] - plain[n]).norm() / plain[n].norm()).item() for n in ref),
        "lora_tensors": sum("lora_" in n for n in ref),
        "trained_in_full": [n for n in ref if "lora_" not in n],
        "gpu": torch.cuda.get_device_name(),
    }
    # The fused path must be as close to fp32 as the plain bf16 path is (bf16 rounding, not a different function).
    result["ok"] = (
        result["loss_rel_diff"] < 1e-3
        and result["grad_err_vs_fp32_fused_max"] <= 1.5 * result["grad_err_vs_fp32_plain_max"] + 1e-3
    )
    return result


def check_packing() -> dict:
    """Packed rows on the GPU: FlexAttention with the mask built from position ids (what --attn_implementation
    auto picks for packed data) against SDPA with lora_ds.packing's dense block-causal mask, both bf16, and both
    against an fp32 run of the dense path."""
    from lora_ds.build import build_trainable
    from lora_ds.config import parse_config
    from lora_ds.data import collate
    from lora_ds.packing import pack_rows

    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(48):
        n = int(torch.randint(60, 270, (1,), generator=gen))
        ids = torch.randint(0, 512, (n,), generator=gen).tolist()
        rows.append(
            {
                "id": str(i),
                "input_ids": ids,
                "labels": [-100] * (n // 2) + ids[n // 2 :],
                "position_ids": list(range(n)),
            }
        )
    packed = pack_rows(rows, 2048)[:4]
    runs = {}
    for name, attn, dtype in (("fp32", "sdpa", "fp32"), ("dense", "sdpa", "bf16"), ("flex", "flex_attention", "bf16")):
        torch.manual_seed(0)
        trainable = build_trainable(
            parse_config(
                [
                    "--model",
                    "preset:tiny-llama",
                    "--dtype",
                    dtype,
                    "--kernels",
                    "off",
                    "--attn_implementation",
                    attn,
                    "--lora_r",
                    "16",
                ]
            ),
            None,
        )
        model = trainable.model
        for n, p in trainable.lora.items():
            if n.endswith("lora_B.weight"):
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        model.cuda()
        batch = {k: v.cuda() for k, v in collate(packed, 0, model.dtype, trainable.mask_from_positions).items()}
        runs[name] = loss_and_grads(model, batch) + ("attention_mask" in batch,)
        del model, trainable
        torch.cuda.empty_cache()
    ref = runs["fp32"][1]

    def worst(grads):
        return max(((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)

    result = {
        "kind": "device_check",
        "family": "packing",
        "rows": len(packed),
        "tokens": sum(len(r["input_ids"]) for r in packed),
        "dense_mask_in_flex_batch": runs["flex"][2],
        "loss_fp32": runs["fp32"][0].item(),
        "loss_dense": runs["dense"][0].item(),
        "loss_flex": runs["flex"][0].item(),
        "grad_err_vs_fp32_dense_max": worst(runs["dense"][1]),
        "grad_err_vs_fp32_flex_max": worst(runs["flex"][1]),
        "gpu": torch.cuda.get_device_name(),
    }
    result["ok"] = (
        not runs["flex"][2]
        and abs(result["loss_flex"] - result["loss_dense"]) / abs(result["loss_dense"]) < 1e-3
        and result["grad_err_vs_fp32_flex_max"] <= 1.5 * result["grad_err_vs_fp32_dense_max"] + 1e-3
    )
    return result


def main(out: str, names: list[str]) -> int:
    """Each check of `names` (all without), its line appended to `out` as soon as it is done."""
    ok = True
    checks = [*FAMILIES.items(), *((name, FAMILIES[f]) for name, f in TRAINED_HEAD.items())]
    checks.append(("packing", (None, None, None)))
    with open(out, "a") as f:
        for name, (model_type, kwargs, targets) in checks:
            if names and name not in names:
                continue
            if name == "packing":
                result = check_packing()
            else:
                result = check(name, model_type, kwargs, targets, train_head=name in TRAINED_HEAD)
            ok &= result["ok"]
            print("CHECK " + json.dumps(result), flush=True)
            f.write(json.dumps(result) + "\n")
            f.flush()
            torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
