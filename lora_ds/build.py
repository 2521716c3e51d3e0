"""The one build sequence of a trainable model, shared by the launcher, the benchmark and the tests:

base model (partitioned under ZeRO-3) -> vocab grown for --add_tokens -> fused kernels -> LoRA -> modules trained
in full (--modules_to_save) -> deferred LM head (the loss) -> activation checkpointing -> ZeRO-3 fetch units
-> DeepSpeed engine
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lora_ds import kernels
from lora_ds.engine import build_engine
from lora_ds.families import default_targets
from lora_ds.lora import expand_all_linear, init_factors, inject_lora, lora_parameters
from lora_ds.loss import defer_lm_head
from lora_ds.model import build_model, has_sliding_window
from lora_ds.saved_modules import embedding_entries, select, tied_names, unfreeze
from lora_ds.vocab import grow_vocab
from lora_ds.zero import fetch_by_layer, keep_frozen_persistent_gathered, skip_resident_fetch_sync, zero3_enabled


@dataclass
class Trainable:
    model: nn.Module
    keepalive: object  # transformers' HfDeepSpeedConfig: must outlive the engine
    targets: list[str] | str  # what --lora_targets selects, all-linear expanded (the adapter's target_modules)
    adapted: list[str]  # names of the LoRA-wrapped modules
    lora: dict  # what the optimizer trains: {"<module>.lora_A.weight": Parameter, ...} and the saved modules' params
    lora_init: dict  # PiSSA/OLoRA: the initial factors {"<module>.lora_A.weight": A0, ...} (fp32, CPU), else {}
    modules_to_save: list[str] | None  # the adapter's modules_to_save (with --add_tokens' embedding and head)
    saved: list[str]  # names of the modules trained in full
    tied: dict  # {"<head>.weight": "<embedding>.weight"} of a trained matrix both share
    fused: list[str]  # fused kernel paths (lora_ds.kernels), [] on the plain path
    attention: str  # the attention implementation built

    @property
    def mask_from_positions(self) -> bool:
        """Whether packed batches go without a dense mask (lora_ds.data.collate): transformers then builds each
        layer's mask from the position ids, FlexAttention's block mask, and for sliding-window layers their window,
        which one dense mask for every layer would lose."""
        return self.attention == "flex_attention" or has_sliding_window(self.model.config)


def build_trainable(
    cfg, ds_config: dict | None, vocab_size: int | None = None, packed: bool = False, first_new_id: int | None = None
) -> Trainable:
    """The base of `cfg.model` with `cfg.lora`'s adapters, ready for `build_engine`; `packed`: the rows are;
    `first_new_id`: the first id --add_tokens added (the vocab then grows to `vocab_size`)."""
    model, keepalive = build_model(
        cfg.model.name,
        cfg.model.dtype,
        ds_config,
        cfg.model.attn_implementation,
        vocab_size,
        packed,
        cfg.model.quantize,
    )
    if first_new_id is not None:
        grow_vocab(model, vocab_size, first_new_id)
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
        init_lora_weights=lc.init_lora_weights,
    )
    modules_to_save = _modules_to_save(model, lc.modules_to_save, first_new_id is not None)
    saved = select(model, modules_to_save, adapted) if modules_to_save else []
    params = lora_parameters(model)
    trained_in_full = unfreeze(model, saved)
    params.update(trained_in_full)
    tied = tied_names(model, trained_in_full)
    if defer_lm_head(model, fused=liger) is not None and liger:
        fused.append("linear_cross_entropy")
    if cfg.model.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ds_config and zero3_enabled(ds_config):
        skip_resident_fetch_sync()
        keep_frozen_persistent_gathered()
        if cfg.model.zero3_fetch == "layer":
            fetch_by_layer(model)
    attention = model.config._attn_implementation
    lora_init = init_factors(model)
    return Trainable(
        model, keepalive, targets, adapted, params, lora_init, modules_to_save, saved, tied, fused, attention
    )


def _modules_to_save(model, requested: list[str] | None, grown: bool) -> list[str] | None:
    """`requested`, and with a grown vocab (--add_tokens) the embedding and head entries it lacks: new rows must be
    trained (as LLaMA-Factory adds them when it resizes the vocab); said once."""
    if not grown:
        return requested
    entries = list(requested or [])
    added = [e for e in embedding_entries(model) if not any(e.endswith(r) for r in entries)]
    if added:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"--add_tokens: {', '.join(added)} trained in full (added to --modules_to_save)", flush=True)
    return entries + added or None


def build(
    cfg,
    ds_config: dict,
    total_steps: int,
    vocab_size: int | None = None,
    packed: bool = False,
    first_new_id: int | None = None,
):
    """(Trainable, DeepSpeed engine) of `cfg`."""
    trainable = build_trainable(cfg, ds_config, vocab_size, packed, first_new_id)
    engine = build_engine(trainable.model, trainable.lora, cfg, ds_config, total_steps)
    return trainable, engine
