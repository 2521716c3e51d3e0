"""Fused GPU kernels behind one switch, `--kernels auto|liger|off`; the plain PyTorch path is their reference.

    auto    Liger-Kernel's Triton kernels when the model runs on a CUDA device and `liger-kernel` is
            installed (`pip install lora-ds[gpu]`); the plain path otherwise (CPU, CI)
    liger   the same, and an error where they cannot run
    off     the plain path

Fused: Liger's RMSNorm, RoPE and SwiGLU for every family Liger patches (Llama, Mistral, Qwen2/3, Gemma,
Phi-3, ...); for GPT-NeoX, which Liger does not patch, Liger's LayerNorm and our one Triton kernel, the qkv
split with its partial RoPE (lora_ds/neox_qkv.py); and Liger's LM-head loss (`linear_cross_entropy`). Each
computes the plain path's function: bench/device_check.py compares loss and LoRA gradients at step 0 on the GPU.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch

from lora_ds.errors import UserError

MODES = ("auto", "liger", "off")


def liger_available() -> bool:
    return torch.cuda.is_available() and all(importlib.util.find_spec(m) for m in ("liger_kernel", "triton"))


def use_liger(mode: str) -> bool:
    """Whether `mode` selects the fused kernels on this machine."""
    if mode not in MODES:
        raise UserError(f"kernels {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return False
    if mode == "liger" and not liger_available():
        raise UserError(
            "--kernels liger: needs a CUDA device and liger-kernel (pip install 'lora-ds[gpu]'); "
            "use --kernels auto to fall back to the plain kernels"
        )
    return liger_available()


def fuse(model) -> list[str]:
    """Swap `model`'s norms, RoPE and MLP activation for Liger's kernels, in place. Returns what was fused.

    Call before LoRA injection and engine creation; the loss is fused separately (`linear_cross_entropy`).
    """
    if model.config.model_type == "gpt_neox":
        return _fuse_gpt_neox(model)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model.config.model_type)
    if apply is None:
        return []
    accepted = inspect.signature(apply).parameters
    wanted = {
        "rope": True,
        "rms_norm": True,
        "swiglu": True,
        "geglu": True,
        "layer_norm": True,
        # lm_loss computes the loss; Liger's own loss patches would replace the model's forward.
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    apply(model=model, **kwargs)
    return sorted(k for k, v in kwargs.items() if v)


def _fuse_gpt_neox(model) -> list[str]:
    from liger_kernel.transformers.functional import liger_layer_norm
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention

    from lora_ds.neox_qkv import attention_forward

    def layer_norm(self, x):
        return liger_layer_norm(x, self.weight, self.bias, self.eps)

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.forward = layer_norm.__get__(module)
        elif isinstance(module, GPTNeoXAttention):
            module.forward = attention_forward.__get__(module)
    return ["layer_norm", "qkv_split_rope"]


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, math
) -> torch.Tensor:
    """Liger's fused LM-head cross-entropy: sum over targets of CE(z, label), no full logits, with z the logits after
    `math` (lora_ds.families.LogitMath): its scale folded into the hidden states (s·h·Wᵀ = (s·h)·Wᵀ), its
    soft-cap by Liger's own `softcap`."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if math.scale != 1.0:
        hidden = hidden * math.scale
    return liger_fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=ignore_index, reduction="sum", softcap=math.softcap
    )
