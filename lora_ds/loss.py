"""The training loss: next-token cross-entropy over target tokens, without materializing full logits.

The LM head is replaced by a `DeferredLMHead` holding the same weight Parameter. While deferred it
passes hidden states through the model's forward; `lm_loss` then calls it with the labels, and it
computes the loss and the gradient of the hidden states chunk by chunk in one pass (the head is frozen:
no weight gradient is needed). Only one chunk's fp32 logits ever exist, instead of bf16 + fp32 logits,
their log-softmax and their gradients for the whole batch. Being a module call that owns the weight,
ZeRO-3 gathers the weight for it. With fused kernels (lora_ds.kernels) Liger's fused linear cross-entropy does
the same in Triton, a few hundred rows at a time; this one is its CPU path and its reference.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lora_ds.data import IGNORE_INDEX

CHUNK_TOKENS = 2048


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over targets of CE(hidden·Wᵀ, label); backward returns the stored d(loss)/d(hidden)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.t()).float()
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            grad = torch.softmax(logits, dim=-1)
            grad[torch.arange(grad.size(0), device=grad.device), safe_y] -= 1.0
            grad *= valid.unsqueeze(1)
            grad_hidden[start : start + chunk] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


class DeferredLMHead(nn.Module):
    """A bias-free output embedding that can hand back hidden states and compute the loss itself."""

    def __init__(self, head: nn.Linear, fused: bool = False):
        super().__init__()
        self.weight = head.weight  # the same Parameter: tied embeddings stay tied
        self.deferred = False
        self.fused = fused

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            if self.fused:
                from lora_ds.kernels import linear_cross_entropy

                return linear_cross_entropy(hidden, self.weight, labels, IGNORE_INDEX)
            return _FusedLinearCrossEntropy.apply(hidden, self.weight, labels, CHUNK_TOKENS)
        return hidden if self.deferred else F.linear(hidden, self.weight)


def defer_lm_head(model: nn.Module, fused: bool = False) -> DeferredLMHead | None:
    """Swap `model`'s output embedding for a DeferredLMHead (not for heads with a bias); `fused`: Liger's loss."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return None
    wrapper = DeferredLMHead(head, fused)
    model.set_output_embeddings(wrapper)
    return wrapper


def _find_deferred(model: nn.Module) -> DeferredLMHead | None:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if isinstance(head, DeferredLMHead) else None


@contextlib.contextmanager
def _deferred(head: DeferredLMHead):
    head.deferred = True
    try:
        yield
    finally:
        head.deferred = False


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy over target tokens (labels != -100) in fp32, number of target tokens).

    Both stay on the device: reading them back would stall the step.
    """
    inputs = dict(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch["position_ids"]
    )
    labels = batch["labels"][:, 1:]
    n_targets = (labels != IGNORE_INDEX).sum()
    head = _find_deferred(model)
    if head is None:
        logits = model(**inputs).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return loss, n_targets
    with _deferred(head):
        hidden = model(**inputs).logits[:, :-1]
    total = head(hidden.reshape(-1, hidden.size(-1)), labels=labels.reshape(-1))
    return total / n_targets, n_targets
