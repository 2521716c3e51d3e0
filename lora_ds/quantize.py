"""QLoRA's frozen base (Dettmers et al. 2023): the Linear weights in 4-bit NF4 through bitsandbytes.

The 4-bit codes are packed into tensors of the compute dtype (bitsandbytes' `quant_storage`), so every parameter
of the model has one dtype and ZeRO-3 partitions the packed weights like any other: PEFT's recipe for DeepSpeed.
A quantized base is not built inside `zero.Init` (transformers skips it for a quantized load; the 4-bit weights
are a quarter of the bf16 ones): each rank quantizes the whole base onto its device, then `deepspeed.initialize`
partitions it. The output head stays in the compute dtype, as transformers keeps it. Only training quantizes:
merge and eval start again from the original base's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_ds.errors import UserError

SKIP = ("lm_head",)  # transformers' default for a 4-bit load: the output head keeps the compute dtype


def require_bitsandbytes() -> None:
    """Refuse --quantize, naming the flag, where bitsandbytes is not installed."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError(f"--quantize nf4 needs bitsandbytes ({e}): pip install 'lora-ds[qlora]'") from e


def bnb_config(dtype: torch.dtype):
    """transformers' BitsAndBytesConfig of --quantize nf4: NF4 codes, double-quantized absmax, `dtype` compute
    and storage."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
        llm_int8_skip_modules=list(SKIP),
    )


def local_device() -> torch.device:
    """The device this rank trains on (DeepSpeed's accelerator: cuda:LOCAL_RANK, or cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@torch.no_grad()
def build_preset(config, kwargs: dict, device: torch.device, quantize: bool = True) -> nn.Module:
    """A preset's model (random weights, which no model dir holds) built on `device` one module at a time, each
    initialised there as transformers initialises it; with `quantize`, each nn.Linear but the head becomes a
    bitsandbytes Linear4bit holding its weight in NF4, as transformers' 4-bit load makes it. Only one Linear is
    ever in the compute dtype: a CPU build and init of a 20B model takes minutes and its full bf16 size."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    for name, module in list(model.named_modules()):
        module.to_empty(device=device, recurse=False)
        model._init_weights(module)
        if quantize and type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in SKIP:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _linear4bit(module, kwargs["dtype"], device))
    model.tie_weights()  # to_empty gave each side of a tie its own tensor
    return model


def _linear4bit(linear: nn.Linear, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=dtype,
        device="meta",
    )
    # Params4bit quantizes when it moves to a device; the bias is an ordinary parameter.
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.to(dtype),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=dtype,
    ).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(device, dtype), requires_grad=False)
    return q


def requantized(weight: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight of `weight`'s kind (quant type, storage, double quantization) holding `dense`, quantized
    on `weight`'s device: PEFT's OLoRA so writes its residual back into a 4-bit base."""
    return type(weight)(
        dense,
        requires_grad=False,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        compress_statistics=weight.compress_statistics,
        module=weight.module,
    ).to(weight.device)


def is_quantized(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None


def matrix_numel(p: torch.Tensor) -> int:
    """Elements of the matrix `p` stands for: a 4-bit weight's unpacked shape, else its full (ZeRO-3) size."""
    from lora_ds.zero import full_numel

    return p.quant_state.shape.numel() if is_quantized(p) else full_numel(p)


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as a dense matrix: a 4-bit weight dequantized into its compute dtype, any other as it is. Needs the
    full (gathered) packed weight under ZeRO-3."""
    if not is_quantized(weight):
        return weight
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight.data, weight.quant_state)
