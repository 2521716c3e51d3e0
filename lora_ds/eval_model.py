"""The model an evaluation runs: a base with its LoRA merged in, in one process or partitioned by ZeRO-3.

The LoRA comes from a PEFT adapter dir (--adapter) or a training checkpoint (--checkpoint, read through a
DeepSpeed engine on as many ranks as wrote it). It is merged
into the base weights by `LoRALinear.merge()` (W0 + s·B·A in fp32 from the fp32 factors, cast once),
under ZeRO-3 on the gathered weights, and the wrappers are then removed: the evaluated model is a plain
Hugging Face model with no added latency, the same weights in one process as on N ranks. A model dir that
is already merged needs neither flag.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from lora_ds.errors import UserError

DEFAULT_SEED = 42  # TrainConfig's default seed: the base a preset run trained on when no run config says


@dataclass
class LoRAWeights:
    config: dict  # adapter_config.json (PEFT's LoraConfig fields)
    tensors: dict | None  # {"<module>.lora_A.weight": fp32 tensor, ...}; None until read from a checkpoint
    source: str
    run_config: dict | None  # the training run's run_config.json, when the source has it
    checkpoint: tuple[str, str] | None = None  # (root, tag) of a training checkpoint
    world_size: int | None = None  # ranks that wrote the checkpoint


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_lora(adapter: str | None, checkpoint: str | None) -> LoRAWeights | None:
    """The LoRA of `--adapter DIR` or `--checkpoint DIR`; None when neither is given."""
    if adapter and checkpoint:
        raise UserError("--adapter and --checkpoint both given; pass one of them")
    if adapter:
        from lora_ds.adapter import read_adapter

        config, tensors = read_adapter(adapter)
        return LoRAWeights(config, {k: v.float() for k, v in tensors.items()}, adapter,
                           _read_json(os.path.join(adapter, "run_config.json")))
    if checkpoint:
        root, tag = checkpoint_tag(checkpoint)
        tag_dir = os.path.join(root, tag)
        config = _read_json(os.path.join(tag_dir, "adapter_config.json"))
        if config is None:
            raise UserError(f"--checkpoint {tag_dir}: no adapter_config.json; is this a lora-ds checkpoint?")
        from lora_ds.checkpoint import read_state

        return LoRAWeights(config, None, tag_dir, _read_json(os.path.join(tag_dir, "run_config.json")),
                           (root, tag), read_state(root, tag)["world_size"])
    return None


def checkpoint_tag(path: str) -> tuple[str, str]:
    """(root, tag) of `--checkpoint`: OUTPUT/checkpoints (the tag `latest` names) or one complete tag dir."""
    from lora_ds.checkpoint import is_complete, resolve_tag

    path = os.path.abspath(path)
    if is_complete(path):
        return os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint {path}: no such directory; give OUTPUT/checkpoints or a tag in it")
    tag = resolve_tag(path, "auto")
    if tag is None:
        raise UserError(f"--checkpoint {path}: no complete checkpoint (no 'latest' file); give OUTPUT/checkpoints "
                        "of a run that saved one, or one of its step_* dirs")
    return path, tag


def read_checkpoint_tensors(name: str, tok, lora: LoRAWeights, dtype: str, ds_config: dict) -> LoRAWeights:
    """`lora` with its fp32 tensors, read from the training checkpoint by DeepSpeed itself: the training
    model and engine are rebuilt, the LoRA weights loaded (not the optimizer state), then both dropped.

    Collective. DeepSpeed reads a ZeRO checkpoint only on as many ranks as wrote it.
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from lora_ds.checkpoint import install_safe_loading
    from lora_ds.config import RunConfig
    from lora_ds.engine import build_engine
    from lora_ds.lora import inject_lora, lora_parameters
    from lora_ds.model import build_model

    world = dist.get_world_size()
    if lora.world_size != world:
        raise UserError(f"--checkpoint {lora.source}: written by {lora.world_size} rank(s), and DeepSpeed loads "
                        f"it only on as many; launch eval on {lora.world_size} rank(s), or export the adapter "
                        "(lora-ds export-adapter) and pass --adapter")
    torch.manual_seed(base_seed(lora))
    model, keepalive = build_model(name, dtype, ds_config, vocab_size=tok.vocab_size)
    cfg = lora.config
    inject_lora(model, cfg["target_modules"], int(cfg["r"]), float(cfg["lora_alpha"]), 0.0,
                bool(cfg.get("use_rslora")))
    params = lora_parameters(model)
    engine = build_engine(model, list(params.values()), RunConfig(), ds_config, total_steps=1)
    install_safe_loading(engine)
    root, tag = lora.checkpoint
    load_path, _ = engine.load_checkpoint(root, tag, load_module_strict=False, load_optimizer_states=False,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise UserError(f"--checkpoint {lora.source}: DeepSpeed could not load it")
    tensors = {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in params.items()}
    engine.destroy()
    del keepalive
    return LoRAWeights(lora.config, tensors, lora.source, lora.run_config, lora.checkpoint, lora.world_size)


def base_seed(lora: LoRAWeights | None) -> int:
    """The seed the training run drew a preset's random base with (its run config), else the default."""
    run = lora.run_config if lora else None
    return int(run["train"]["seed"]) if run and "train" in run else DEFAULT_SEED


def merge_lora(model, lora: LoRAWeights) -> list[str]:
    """Merge `lora` into `model`'s base weights and unwrap the LoRA layers. Collective under ZeRO-3 (every
    rank must call it, before the engine is built). Returns the merged module names."""
    from lora_ds.lora import inject_lora, lora_modules
    from lora_ds.zero import gathered

    cfg = lora.config
    targets = cfg.get("target_modules")
    if not targets:
        raise UserError(f"{lora.source}: adapter_config.json has no target_modules")
    inject_lora(model, targets, int(cfg["r"]), float(cfg["lora_alpha"]), 0.0, bool(cfg.get("use_rslora")))
    modules = lora_modules(model)
    expected = {f"{name}.lora_{part}.weight" for name, _ in modules for part in "AB"}
    if expected != set(lora.tensors):
        missing, unexpected = sorted(expected - set(lora.tensors)), sorted(set(lora.tensors) - expected)
        raise UserError(f"{lora.source}: its LoRA tensors do not fit this model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); pass the --model the adapter was trained on")
    for name, module in modules:
        # fp32 factors, so the merge is s·B·A of the trained fp32 weights, cast once into the base dtype.
        module.lora_A.float()
        module.lora_B.float()
        with torch.no_grad():
            for part, layer in (("A", module.lora_A), ("B", module.lora_B)):
                value = lora.tensors[f"{name}.lora_{part}.weight"]
                if value.shape != layer.weight.shape:
                    raise UserError(f"{lora.source}: {name}.lora_{part}.weight has shape {tuple(value.shape)}, "
                                    f"this model needs {tuple(layer.weight.shape)}; pass the --model the "
                                    "adapter was trained on")
                layer.weight.copy_(value)
        with gathered([module.base_layer.weight], modifier_rank=0):
            module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_layer)
    return [name for name, _ in modules]


def build_eval_model(name: str, tok, lora: LoRAWeights | None, dtype: str, ds_config: dict | None,
                     attn_implementation: str = "sdpa"):
    """(model for generation, its device, keepalive): plain in this process, or the module of a ZeRO-3
    inference engine when `ds_config` is given (collective then). `keepalive` must outlive the model."""
    from lora_ds.model import build_model

    if lora is not None and lora.tensors is None:
        if ds_config is None:
            raise UserError(f"--checkpoint {lora.source}: reading a checkpoint needs DeepSpeed; pass --ds_config")
        lora = read_checkpoint_tensors(name, tok, lora, dtype, ds_config)
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
