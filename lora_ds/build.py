"""The one build sequence of a trainable model, shared by the launcher, the benchmark and the tests:

base model (partitioned under ZeRO-3) -> fused kernels -> LoRA -> deferred LM head (the loss)
-> activation checkpointing -> ZeRO-3 fetch units -> DeepSpeed engine
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lora_ds import kernels
from lora_ds.engine import build_engine
from lora_ds.families import default_targets
from lora_ds.lora import expand_all_linear, inject_lora, lora_parameters
from lora_ds.loss import defer_lm_head
from lora_ds.model import build_model, has_sliding_window
from lora_ds.zero import fetch_by_layer, skip_resident_fetch_sync, zero3_enabled


@dataclass
class Trainable:
    model: nn.Module
    keepalive: object  # transformers' HfDeepSpeedConfig: must outlive the engine
    targets: list[str] | str  # what --lora_targets selects, all-linear expanded (the adapter's target_modules)
    adapted: list[str]  # names of the LoRA-wrapped modules
    lora: dict  # {"<module>.lora_A.weight": Parameter, ...}
    fused: list[str]  # fused kernel paths (lora_ds.kernels), [] on the plain path
    attention: str  # the attention implementation built

    @property
    def mask_from_positions(self) -> bool:
        """Whether packed batches go without a dense mask (lora_ds.data.collate): transformers then builds each
        layer's mask from the position ids, FlexAttention's block mask, and for sliding-window layers their window,
        which one dense mask for every layer would lose."""
        return self.attention == "flex_attention" or has_sliding_window(self.model.config)


def build_trainable(cfg, ds_config: dict | None, vocab_size: int | None = None, packed: bool = False) -> Trainable:
    """The base of `cfg.model` with `cfg.lora`'s adapters, ready for `build_engine`; `packed`: the rows are."""
    model, keepalive = build_model(
        cfg.model.name,
        cfg.model.dtype,
        ds_config,
        cfg.model.attn_implementation,
        vocab_size,
        packed,
        cfg.model.quantize,
    )
    liger = kernels.use_liger(cfg.model.kernels)
    fused = kernels.fuse(model) if liger else []
    targets = expand_all_linear(model, cfg.lora.target_spec() or default_targets(model))
    lc = cfg.lora
    adapted = inject_lora(
        model,
        targets,
        lc.r,
        lc.alpha,
        lc.dropout,
        lc.rslora,
        seed=cfg.train.seed,
        rank_pattern=lc.rank_pattern,
        alpha_pattern=lc.alpha_pattern,
        use_dora=lc.use_dora,
    )
    if defer_lm_head(model, fused=liger) is not None and liger:
        fused.append("linear_cross_entropy")
    if cfg.model.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ds_config and zero3_enabled(ds_config):
        skip_resident_fetch_sync()
        if cfg.model.zero3_fetch == "layer":
            fetch_by_layer(model)
    attention = model.config._attn_implementation
    return Trainable(model, keepalive, targets, adapted, lora_parameters(model), fused, attention)


def build(cfg, ds_config: dict, total_steps: int, vocab_size: int | None = None, packed: bool = False):
    """(Trainable, DeepSpeed engine) of `cfg`."""
    trainable = build_trainable(cfg, ds_config, vocab_size, packed)
    engine = build_engine(trainable.model, trainable.lora, cfg, ds_config, total_steps)
    return trainable, engine
