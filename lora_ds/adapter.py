"""PEFT-format adapters: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, as PEFT writes them, so
`peft.PeftModel.from_pretrained(base, dir)` loads what we write and we load what PEFT writes.
"""
from __future__ import annotations

import json
import os

import torch

from lora_ds.errors import UserError
from lora_ds.fsutil import atomic_dir, write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peft_config(*, r: int, alpha: float, dropout: float, target_modules, use_rslora: bool,
                fan_in_fan_out: bool, base_model: str) -> dict:
    """The adapter_config.json PEFT reads (LoraConfig fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def scaling(config: dict) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = config["r"]
    return config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)


def write_adapter(out_dir: str, tensors: dict, config: dict, dtype: str = "fp32", extra_json: dict | None = None):
    """Write `tensors` ({"<module>.lora_A.weight": T, ...}) and `config` to `out_dir`, atomically."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    state = {PEFT_PREFIX + k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in sorted(tensors.items())}
    with atomic_dir(out_dir) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(os.path.join(tmp, CONFIG_FILE), config)
        for name, obj in (extra_json or {}).items():
            write_json(os.path.join(tmp, name), obj)


def read_adapter(adapter_dir: str) -> tuple[dict, dict]:
    """(config, {"<module>.lora_A.weight": T, ...}) of a PEFT LoRA adapter directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(adapter_dir, CONFIG_FILE)
    weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise UserError(f"{path}: missing; --adapter must be a PEFT adapter directory "
                            f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e}); re-export the adapter") from e
    if config.get("peft_type") != "LORA":
        raise UserError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise UserError(f"{cfg_path}: field {field!r} must be a positive number, got {config.get(field)!r}")
    try:
        raw = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_path}: unreadable safetensors file ({e}); re-export the adapter") from e
    tensors = {}
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        # PEFT may keep the adapter name in keys (".lora_A.default.weight"); files it saves drop it.
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        tensors[name] = value
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    for m in sorted(modules):
        for part in ("lora_A", "lora_B"):
            if f"{m}.{part}.weight" not in tensors:
                raise UserError(f"{weights_path}: {m}.{part}.weight is missing; the adapter file is incomplete")
    return config, tensors
