"""LoRA tensors out of a ZeRO-3 checkpoint, on a CPU: no process group, no base model, any world size.

The fp32 masters are consolidated from every rank's partitions by `lora_ds.checkpoint_files` (mmap: frozen
fragments and Adam moments are never read) and checked against the tag's adapter config by
`lora_ds.adapter.check_lora`. `lora-ds export-adapter` writes them as a PEFT adapter; `lora-ds eval
--checkpoint` merges them into its base. A PiSSA/OLoRA tag's factors are converted to a plain LoRA of the original
base with the initial factors the tag holds (`lora_ds.adapter.to_original_base`), so both see what the trainer's own
adapter is.
"""

from __future__ import annotations

import os

from lora_ds.adapter import (
    CONFIG_FILE,
    RUN_CONFIG,
    LoRAWeights,
    check_config,
    check_lora,
    read_run_config,
    to_original_base,
    with_tied,
    write_adapter,
)
from lora_ds.checkpoint_files import (
    LATEST,
    MODEL_STATES,
    check_complete,
    latest_tag,
    read_lora_init,
    read_zero3_params,
    tags,
)
from lora_ds.errors import UserError
from lora_ds.fsutil import read_json
from lora_ds.lora import mutates_base
from lora_ds.vocab import tokenizer_files


def resolve_tag_dir(checkpoint: str, tag: str | None = None) -> str:
    """The tag dir to read: `checkpoint/tag`, `checkpoint/<latest>`, or `checkpoint` if it is a tag dir."""
    if not os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: no such directory; give OUTPUT/checkpoints of a run")
    hint = "pass --tag to read an earlier one"
    if tag is None and os.path.isfile(os.path.join(checkpoint, MODEL_STATES.format(0))):
        check_complete(checkpoint, f"--checkpoint {checkpoint}", hint)
        return checkpoint
    if tag is None:
        tag = latest_tag(checkpoint, hint)
        if tag is None:
            raise UserError(
                f"--checkpoint {checkpoint}: no '{LATEST}' file; pass --tag (tags here: "
                f"{', '.join(tags(checkpoint)) or 'none'})"
            )
    else:
        check_complete(os.path.join(checkpoint, tag), f"--tag {tag}", hint)
    return os.path.join(checkpoint, tag)


def read_checkpoint_lora(checkpoint: str, tag: str | None = None) -> tuple[LoRAWeights, int]:
    """(the checked LoRA of a checkpoint tag, as a LoRA of the original base; the number of ranks that wrote it)."""
    tag_dir = resolve_tag_dir(checkpoint, tag)
    config_path = os.path.join(tag_dir, CONFIG_FILE)
    config = check_config(
        read_json(config_path, "the trainer writes the adapter config into every checkpoint tag"),
        config_path,
        residual_base=True,
    )
    run_config = read_run_config(tag_dir)
    tensors, world = read_zero3_params(tag_dir)
    check_lora(tensors, config, tag_dir, (run_config or {}).get("resolved", {}).get("adapted_modules"))
    if mutates_base(config.get("init_lora_weights")):
        tensors, config = to_original_base(tensors, config, read_lora_init(tag_dir), tag_dir)
    return LoRAWeights(config, tensors, tag_dir, run_config), world


def export_adapter(checkpoint: str, out_dir: str, tag: str | None = None, dtype: str = "fp32") -> dict:
    """Write the PEFT adapter of a ZeRO-3 checkpoint to `out_dir`. Returns a report."""
    lora, world = read_checkpoint_lora(checkpoint, tag)
    # The tokenizer that --add_tokens extended is saved in the tag, and goes with the adapter.
    extra = ({RUN_CONFIG: lora.run_config} if lora.run_config else {}) | tokenizer_files(lora.source)
    tied = (lora.run_config or {}).get("resolved", {}).get("tied_weights")
    write_adapter(out_dir, with_tied(lora.tensors, tied), lora.config, dtype, extra_json=extra)
    return {
        "checkpoint": os.path.abspath(lora.source),
        "world_size": world,
        "modules": len(lora.modules),
        "params": sum(t.numel() for t in lora.tensors.values()),
        "out": os.path.abspath(out_dir),
        "dtype": dtype,
    }
