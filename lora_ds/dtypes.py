"""The dtype names that --dtype flags and configs use, and the torch dtypes they mean."""

from __future__ import annotations

import torch

from lora_ds.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
