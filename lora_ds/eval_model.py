"""The model an evaluation runs: a base with its LoRA merged in, in one process or partitioned by ZeRO-3.

The LoRA comes from a PEFT adapter dir (--adapter) or a training checkpoint (--checkpoint: its fp32 masters,
consolidated from the ZeRO-3 partitions by `lora_ds.consolidate`, whatever the world size). It is merged into
the base weights by `lora_ds.merge.merge_live` (W0 + s·B·A in fp32 from the fp32 factors, cast once), under
ZeRO-3 on the gathered weights, and the wrappers are then removed: the evaluated model is a plain Hugging Face model
with no added latency, the same weights in one process as on N ranks. A model dir that is already merged
needs neither flag.
"""

from __future__ import annotations

import torch

from lora_ds.adapter import LoRAWeights, inject_adapter
from lora_ds.errors import UserError

DEFAULT_SEED = 42  # TrainConfig's default seed: the base a preset run trained on when no run config says


def read_lora(adapter: str | None, checkpoint: str | None) -> LoRAWeights | None:
    """The LoRA of `--adapter DIR` or `--checkpoint DIR`, checked and in fp32; None when neither is given."""
    if adapter and checkpoint:
        raise UserError("--adapter and --checkpoint both given; pass one of them")
    if adapter:
        from lora_ds.adapter import read_adapter, read_run_config

        config, tensors = read_adapter(adapter)
        return LoRAWeights(config, {k: v.float() for k, v in tensors.items()}, adapter, read_run_config(adapter))
    if checkpoint:
        from lora_ds.consolidate import read_checkpoint_lora

        return read_checkpoint_lora(checkpoint)[0]
    return None


def base_seed(lora: LoRAWeights | None) -> int:
    """The seed the training run drew a preset's random base with (its run config), else the default."""
    run = lora.run_config if lora else None
    return int(run["train"]["seed"]) if run and "train" in run else DEFAULT_SEED


def merge_lora(model, lora: LoRAWeights) -> list[str]:
    """Merge `lora` into `model`'s base weights and unwrap the LoRA layers. Collective under ZeRO-3 (every
    rank must call it, before the engine is built). Returns the merged module names."""
    from lora_ds.adapter import saved_tensors
    from lora_ds.lora import lora_modules
    from lora_ds.merge import merge_live

    saved = saved_tensors(lora.tensors)
    if saved:
        raise UserError(
            f"{lora.source}: it trains {', '.join(sorted(saved)[:2])} in full (modules_to_save), which evaluation "
            "does not load yet; merge it first (lora-ds merge --base ... --adapter ... --out DIR) and evaluate DIR"
        )
    inject_adapter(model, lora.config)
    dora = bool(lora.config.get("use_dora"))
    modules = lora_modules(model)
    expected = {f"{name}.lora_{part}.weight" for name, _ in modules for part in "AB"}
    expected |= {f"{name}.lora_magnitude_vector" for name, _ in modules if dora}
    if expected != set(lora.tensors):
        missing, unexpected = sorted(expected - set(lora.tensors)), sorted(set(lora.tensors) - expected)
        raise UserError(
            f"{lora.source}: its LoRA tensors do not fit this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); pass the --model the adapter was trained on"
        )
    for name, module in modules:
        for key, param in _lora_tensors(name, module):
            value = lora.tensors[key]
            if value.shape != param.shape:
                raise UserError(
                    f"{lora.source}: {key} has shape {tuple(value.shape)}, this model needs "
                    f"{tuple(param.shape)}; pass the --model the adapter was trained on"
                )
            # fp32 tensors, so the merge is that of the trained fp32 weights, cast once into the base dtype.
            param.data = param.data.float()
            with torch.no_grad():
                param.copy_(value)
        merge_live(module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_layer)
    return [name for name, _ in modules]


def _lora_tensors(name: str, module):
    """(adapter key, Parameter) of each trainable tensor of one LoRA layer."""
    pairs = [(f"{name}.lora_A.weight", module.lora_A.weight), (f"{name}.lora_B.weight", module.lora_B.weight)]
    if module.use_dora:
        pairs.append((f"{name}.lora_magnitude_vector", module.lora_magnitude_vector))
    return pairs


def build_eval_model(
    name: str, tok, lora: LoRAWeights | None, dtype: str, ds_config: dict | None, attn_implementation: str = "auto"
):
    """(model for generation, its device, keepalive): plain in this process, or the module of a ZeRO-3
    inference engine when `ds_config` is given (collective then). `keepalive` must outlive the model."""
    from lora_ds.model import build_model

    torch.manual_seed(base_seed(lora))  # a preset base has random weights: draw those the run trained on
    model, keepalive = build_model(name, dtype, ds_config, attn_implementation, vocab_size=tok.vocab_size)
    if lora is not None:
        merge_lora(model, lora)
    if ds_config is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device).eval(), device, keepalive
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    return engine.module.eval(), engine.device, keepalive
