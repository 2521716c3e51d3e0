"""The model an evaluation runs: a base with its LoRA merged in, in one process or partitioned by ZeRO-3.

The LoRA comes from a PEFT adapter dir (--adapter) or a training checkpoint (--checkpoint: its fp32 masters,
consolidated from the ZeRO-3 partitions by `lora_ds.consolidate`, whatever the world size). It is merged into
the base weights by `lora_ds.merge.merge_live` (W0 + s·B·A in fp32 from the fp32 factors, cast once), under
ZeRO-3 on the gathered weights, and the wrappers are then removed: the evaluated model is a plain Hugging Face model
with no added latency, the same weights in one process as on N ranks. A model dir that is already merged
needs neither flag.

Modules the adapter trained in full (modules_to_save, lora_ds.saved_modules) replace the base's params, the
embeddings first grown to the adapter's rows (a vocabulary grown by --add_tokens, whose tokenizer the adapter or
checkpoint tag carries: `lora_tokenizer_dir`), as `lora-ds merge` writes them into the merged dir.
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


def lora_tokenizer_dir(lora: LoRAWeights | None) -> str | None:
    """The adapter dir or checkpoint tag of `lora` when it carries a tokenizer (--add_tokens extended it)."""
    from lora_ds.vocab import tokenizer_files

    return lora.source if lora is not None and tokenizer_files(lora.source) else None


def load_saved(model, lora: LoRAWeights) -> list[str]:
    """Copy the modules `lora` trained in full into `model`'s params, its embeddings first grown to the adapter's
    rows (`grow_to_saved`). A matrix that tied embeddings share is written once. Collective under ZeRO-3. Returns
    the names written."""
    from lora_ds.adapter import saved_tensors
    from lora_ds.zero import full_shape, gathered

    saved = saved_tensors(lora.tensors)
    grown = grow_to_saved(model, saved, lora.source)
    params = dict(model.named_parameters(remove_duplicate=False))
    written = {}
    for key, value in sorted(saved.items()):
        param = params.get(key)
        if param is None or tuple(full_shape(param)) != tuple(value.shape):
            found = f"is {list(full_shape(param))} in this model" if param is not None else "is not in this model"
            raise UserError(
                f"{lora.source}: {key} (modules_to_save) is {list(value.shape)}, but it {found}; "
                "pass the --model the adapter was trained on"
            )
        if id(param) in written:  # the other name of a tied matrix (ensure_weight_tying): the same values
            if not torch.equal(value, saved[written[id(param)]]):
                raise UserError(f"{lora.source}: {key} and {written[id(param)]} are one tied matrix but differ")
            continue
        written[id(param)] = key
        with gathered([param], modifier_rank=0), torch.no_grad():
            param.copy_(value)
    unset = [n for n in grown if id(params[n]) not in written]
    if unset:
        raise UserError(
            f"{lora.source}: its vocabulary grew, but it holds no {unset[0]}; an adapter of --add_tokens trains "
            "the input embedding and the output head in full"
        )
    return list(written.values())


def grow_to_saved(model, saved: dict, source: str) -> list[str]:
    """Grow `model`'s input embedding and output head to the rows of the adapter's (`saved`: its modules trained
    in full), as `lora-ds merge` writes them and as PEFT needs the base resized. Returns the names of the grown
    params (none when the vocabulary fits). Collective under ZeRO-3."""
    from lora_ds.vocab import ensure_rows, vocab_matrices

    matrices = vocab_matrices(model)
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if any(p is m for m in matrices)]
    rows = {saved[n].shape[0] for n in names if n in saved}
    if len(rows) > 1:
        raise UserError(f"{source}: its input embedding and output head disagree on the vocabulary ({sorted(rows)})")
    # The saved values then replace the grown matrices whole.
    return names if rows and ensure_rows(model, max(rows)) else []


def merge_lora(model, lora: LoRAWeights) -> list[str]:
    """Load `lora`'s modules trained in full into `model`, merge its LoRA into the base weights and unwrap the LoRA
    layers. Collective under ZeRO-3 (every rank must call it, before the engine is built). Returns the merged
    module names."""
    from lora_ds.adapter import saved_tensors
    from lora_ds.lora import lora_modules
    from lora_ds.merge import merge_live

    saved = saved_tensors(lora.tensors)
    load_saved(model, lora)
    inject_adapter(model, lora.config)
    dora = bool(lora.config.get("use_dora"))
    modules = lora_modules(model)
    expected = {f"{name}.lora_{part}.weight" for name, _ in modules for part in "AB"}
    expected |= {f"{name}.lora_magnitude_vector" for name, _ in modules if dora}
    given = set(lora.tensors) - set(saved)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
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
