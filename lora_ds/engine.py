"""AdamW over the LoRA factors, its warm-up/decay schedule, and the DeepSpeed engine around them."""

from __future__ import annotations

import torch

from lora_ds.zero import full_shape


class WarmupLinear:
    """LR multiplier: linear warm-up over `warmup` steps, then linear decay to 0 at `total` steps.

    A class rather than a lambda so the scheduler's state_dict records it.
    """

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def param_groups(lora: dict, lr: float, loraplus_lr_ratio: float | None) -> list[dict]:
    """The optimizer's parameter groups of the LoRA factors `lora` ({"<module>.lora_A.weight": param, ...}):
    one group, or with LoRA+ the A factors at `lr` and the B factors (and DoRA's magnitudes) at `lr` × ratio, as PEFT's
    `create_loraplus_optimizer` groups them (its embedding group is empty here: embeddings are never adapted).
    The schedule's multiplier scales each group's own lr."""
    if loraplus_lr_ratio is None:
        return [{"params": list(lora.values()), "lr": lr}]
    # PEFT's rule: lora_B and every vector (DoRA's magnitudes) learn at the ratio, the rest (lora_A) at lr.
    # Saved modules' params (--modules_to_save) are partitioned already: their whole shape says.
    fast = {name: "lora_B" in name or len(full_shape(p)) == 1 for name, p in lora.items()}
    a = [p for name, p in lora.items() if not fast[name]]
    b = [p for name, p in lora.items() if fast[name]]
    return [{"params": a, "lr": lr}, {"params": b, "lr": lr * loraplus_lr_ratio}]


def build_optimizer(params, lr: float, weight_decay: float, ds_config: dict):
    """AdamW (the paper's optimizer) over `params` (tensors or param groups). DeepSpeed's CPU Adam when ZeRO
    offloads the optimizer state."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, foreach=not fused)


def build_engine(model, lora: dict, cfg, ds_config: dict, total_steps: int):
    """deepspeed.initialize with only the LoRA params `lora` ({name: param}) given to the optimizer."""
    import deepspeed

    groups = param_groups(lora, cfg.train.lr, cfg.train.loraplus_lr_ratio)
    optimizer = build_optimizer(groups, cfg.train.lr, cfg.train.weight_decay, ds_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinear(cfg.train.warmup, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine
