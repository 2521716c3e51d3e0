"""The model families lora_ds knows, by transformers `model_type`: default LoRA targets and the LM head's logit math.

The default targets are the paper's (the attention query and value projections), PEFT's defaults; a fused QKV
projection (GPT-NeoX, GPT-2, Phi-3) is adapted whole, as PEFT does. The logit math is what the model's own forward
applies to its head's output before its loss (Gemma 2's final soft-cap, Cohere's and Granite's logit scales), so
that the fused loss (lora_ds.loss) optimises the model's own objective; a model type not listed here trains on the
model's own loss, over full logits. The README lists the families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_ds.errors import UserError


@dataclass(frozen=True)
class LogitMath:
    """logits = softcap · tanh(scale · h·Wᵀ / softcap), or scale · h·Wᵀ when softcap is None."""

    scale: float = 1.0
    softcap: float | None = None


def _plain(config) -> LogitMath:
    return LogitMath()


def _final_softcap(config) -> LogitMath:
    return LogitMath(softcap=config.final_logit_softcapping)


@dataclass(frozen=True)
class Family:
    targets: tuple[str, ...]
    logits: Callable[[object], LogitMath] = _plain


QV = ("q_proj", "v_proj")
FAMILIES = {
    "gpt_neox": Family(("query_key_value",)),
    "gpt2": Family(("c_attn",)),
    "llama": Family(QV),
    "mistral": Family(QV),
    "qwen2": Family(QV),
    "qwen3": Family(QV),
    "gemma2": Family(QV, _final_softcap),
    "gemma3_text": Family(QV, _final_softcap),
    "phi3": Family(("qkv_proj",)),
    "cohere": Family(QV, lambda config: LogitMath(scale=float(config.logit_scale))),
    "granite": Family(QV, lambda config: LogitMath(scale=1.0 / config.logits_scaling)),
}


def default_targets(model) -> list[str]:
    """The default --lora_targets of `model`'s family."""
    family = FAMILIES.get(model.config.model_type)
    if family is None:
        raise UserError(
            f"no default LoRA targets for model type {model.config.model_type!r}; pass --lora_targets "
            "(module names, re:PATTERN or all-linear)"
        )
    return list(family.targets)


def logit_math(config) -> LogitMath | None:
    """What a model of `config` applies to its head's output before the loss; None for a model type not known here."""
    family = FAMILIES.get(config.model_type)
    return family.logits(config) if family else None
