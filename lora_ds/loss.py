"""The training loss: the model's own next-token cross-entropy over target tokens, without materializing full logits.

The LM head is replaced by a `DeferredLMHead` holding the same weight Parameter. While deferred it
keeps the hidden states that the model's forward hands it; `lm_loss` then calls it with the labels, and it
computes the loss and the gradient of the hidden states chunk by chunk in one pass (and the head's weight
gradient when the head is trained in full: --modules_to_save). Only one chunk's fp32 logits ever exist, instead of
bf16 + fp32 logits, their log-softmax and their gradients for the whole batch. Being a module call that owns the weight,
ZeRO-3 gathers the weight for it. With fused kernels (lora_ds.kernels) Liger's fused linear cross-entropy does
the same in Triton, a few hundred rows at a time; this one is its CPU path and its reference.

What a model's forward applies to its head's output before its loss (Gemma 2's final soft-capping, Cohere's and
Granite's logit scales: lora_ds.families.LogitMath) is applied here too, so that the loss is the model's own. A
model type lora_ds does not know, or a head with a bias, is not deferred: it trains on the model's own `labels=`
loss, over full logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lora_ds.data import IGNORE_INDEX
from lora_ds.families import LogitMath, logit_math

CHUNK_TOKENS = 2048


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over targets of CE(z, label), z = cap·tanh(s·hidden·Wᵀ / cap) (`math`'s scale s and softcap cap);
    backward returns the stored d(loss)/d(hidden), and d(loss)/dW (accumulated in fp32) when W is trained."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, math: LogitMath):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.t()).float()
            if math.scale != 1.0:
                logits *= math.scale
            if math.softcap is not None:
                capped = torch.tanh(logits / math.softcap)
                logits = capped * math.softcap
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            grad = torch.softmax(logits, dim=-1)
            grad[torch.arange(grad.size(0), device=grad.device), safe_y] -= 1.0
            grad *= valid.unsqueeze(1)
            if math.softcap is not None:
                grad *= 1.0 - capped.square()  # d(cap·tanh(u / cap))/du
            if math.scale != 1.0:
                grad *= math.scale
            grad_hidden[start : start + chunk] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(grad_hidden.dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, None, None, None


class DeferredLMHead(nn.Module):
    """A bias-free output embedding that can keep the hidden states for the loss and compute the loss itself.

    While deferred it keeps its input (`hidden`) and gives the model an empty tensor: whatever the model's forward
    then does to its head's output (soft-capping, scaling) runs on nothing, and the loss applies `math` itself.
    """

    def __init__(self, head: nn.Linear, math: LogitMath, fused: bool = False):
        super().__init__()
        self.weight = head.weight  # the same Parameter: tied embeddings stay tied
        self.math = math
        self.deferred = False
        self.hidden: torch.Tensor | None = None
        self.fused = fused

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            if self.fused:
                from lora_ds.kernels import linear_cross_entropy

                return linear_cross_entropy(hidden, self.weight, labels, IGNORE_INDEX, self.math)
            return _FusedLinearCrossEntropy.apply(hidden, self.weight, labels, CHUNK_TOKENS, self.math)
        if self.deferred:
            self.hidden = hidden
            return hidden[..., :0]
        return F.linear(hidden, self.weight)


def defer_lm_head(model: nn.Module, fused: bool = False) -> DeferredLMHead | None:
    """Swap `model`'s output embedding for a DeferredLMHead; `fused`: Liger's loss. Not for a head with a bias, nor
    for a model type whose logit math lora_ds.families does not know: those keep the model's own loss."""
    head = model.get_output_embeddings()
    math = logit_math(model.config)
    if math is None or getattr(head, "bias", None) is not None:
        return None
    wrapper = DeferredLMHead(head, math, fused)
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
        head.deferred, head.hidden = False, None


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
    if head is None:  # the model's own loss: it shifts the labels itself
        return model(**inputs, labels=batch["labels"]).loss.float(), n_targets
    with _deferred(head):
        model(**inputs)
        hidden = head.hidden[:, :-1]
    total = head(hidden.reshape(-1, hidden.size(-1)), labels=labels.reshape(-1))
    return total / n_targets, n_targets
