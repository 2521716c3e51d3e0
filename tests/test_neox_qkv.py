"""lora_ds/neox_qkv.py, GPT-NeoX's qkv split + partial RoPE kernel, run on CPU by Triton's interpreter against
transformers' own view, chunk and apply_rotary_pos_emb (the GPU runs the same kernel compiled:
bench/device_check.py)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
# Read when the kernels are decorated: the interpreter runs them on CPU tensors.
os.environ["TRITON_INTERPRET"] = "1"

from transformers.models.gpt_neox import modeling_gpt_neox  # noqa: E402

from lora_ds.neox_qkv import attention_forward, split_rotate  # noqa: E402


def rotary(batch: int, seq: int, rotary_dim: int, packed: bool, generator):
    """cos, sin [B or 1, S, R] with duplicated halves, as GPT-NeoX's rotary embedding gives them; packed rows
    restart their positions at each example."""
    positions = torch.arange(seq).repeat(batch, 1)
    if packed:
        positions[:, seq // 2 :] -= seq // 2
    else:
        positions = positions[:1]
    freqs = positions[..., None] * torch.rand(rotary_dim // 2, generator=generator)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def plain_split_rotate(qkv, cos, sin, heads):
    batch, seq, _ = qkv.shape
    q, k, v = qkv.view(batch, seq, heads, -1).transpose(1, 2).chunk(3, dim=-1)
    return (*modeling_gpt_neox.apply_rotary_pos_emb(q, k, cos, sin), v)


@pytest.mark.parametrize(
    "heads, head_dim, rotary_dim, packed",
    [(3, 16, 4, True), (3, 12, 4, False), (3, 8, 8, True), (20, 128, 32, True)],
    ids=[
        "R = D/4 as pythia",
        "head not a power of 2 (gpt-neox-20b: 96)",
        "whole head rotated",
        "heads in two tiles, the second part-full",
    ],
)
def test_split_rotate_equals_transformers_forward_and_backward(heads, head_dim, rotary_dim, packed):
    gen = torch.Generator().manual_seed(0)
    batch, seq = 2, 6
    cos, sin = rotary(batch, seq, rotary_dim, packed, gen)
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, generator=gen, requires_grad=True)
    ours = split_rotate(qkv, cos, sin, heads)
    plain = plain_split_rotate(qkv, cos, sin, heads)
    for a, b in zip(ours, plain):
        assert a.shape == b.shape == (batch, heads, seq, head_dim)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    grads = [torch.randn(t.shape, generator=gen) for t in plain]
    (grad_plain,) = torch.autograd.grad(plain, qkv, grads)
    # Gradients in another layout than the outputs', as attention's backward may hand them over.
    strided = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
    (grad_ours,) = torch.autograd.grad(ours, qkv, strided)
    torch.testing.assert_close(grad_ours, grad_plain, rtol=0, atol=1e-6)


def test_attention_forward_gives_the_models_loss_and_gradients():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neox", hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        vocab_size=64, rotary_pct=0.25, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "query_key_value" in n}

    plain_loss, plain_grads = loss_and_grads()
    for layer in model.gpt_neox.layers:
        layer.attention.forward = attention_forward.__get__(layer.attention)
    fused_loss, fused_grads = loss_and_grads()
    torch.testing.assert_close(fused_loss, plain_loss, rtol=0, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6)
