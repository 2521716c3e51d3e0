"""GPT-NeoX's attention input in one Triton kernel each way: split the fused qkv projection, rotate q and k.

GPT-NeoX projects q, k and v with one Linear whose output holds, per head, q (D channels), k and v side by side,
and rotates only the first R = rotary_pct·D channels of each head (partial RoPE). Transformers views that output
as [B, H, S, 3D], chunks it, rotates with two slices and a cat per tensor, and autograd undoes it all in backward
(a cat of dq, dk, dv and a strided copy back): on pythia-6.9b those copies were 13 % of a step's CUDA time.
Here forward reads the projection once and writes q, k (rotated) and v in [B, S, H, D] layout, which SDPA and
FlexAttention take as [B, H, S, D] without a copy; backward reads dq, dk, dv once and writes the projection's
gradient. The rotation is `apply_rotary_pos_emb` of transformers (rotate_half convention, cos/sin [B, S, R]
with duplicated halves), computed in fp32 and rounded once.

Triton only: kernels.fuse uses it on CUDA; CPU tests run it with TRITON_INTERPRET=1 against the plain path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(base, rows, cos_ptr, sin_ptr, d, mask, R: tl.constexpr, backward: tl.constexpr):
    """Heads at `rows` of `base`, their channels d: x·cos ∓ partner·sin on the first R (partner: the same
    channel of the other half), x itself beyond."""
    half = R // 2
    rotated = d < R
    partner = tl.where(d < half, d + half, d - half)
    x = tl.load(base + rows + d, mask=mask).to(tl.float32)
    p = tl.load(base + rows + partner, mask=mask & rotated, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + d, mask=rotated, other=1.0).to(tl.float32)
    # Forward: out[i] = x[i]·cos[i] - x[i+R/2]·sin[i] (first half), + x[i-R/2]·sin[i] (second half).
    # Backward is its transpose: dx[i] = g[i]·cos[i] + g[i+R/2]·sin[i+R/2] (first half), - g[i-R/2]·sin[i-R/2].
    if backward:
        s = tl.load(sin_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
        sign = tl.where(d < half, 1.0, -1.0)
    else:
        s = tl.load(sin_ptr + d, mask=rotated, other=0.0).to(tl.float32)
        sign = tl.where(d < half, -1.0, 1.0)
    return x * c + sign * p * s


@triton.jit
def _forward_kernel(
    qkv_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, S, H, cos_stride_b, cos_stride_s,
    D: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # A program: one token, BLOCK_H of its heads. int64: token·H·3D passes 2^31 at ~120k tokens (pythia widths).
    token = tl.program_id(0).to(tl.int64)
    b, s = token // S, token % S
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < D)
    src = qkv_ptr + token * H * 3 * D
    dst = token * H * D + h * D + d
    cos = cos_ptr + b * cos_stride_b + s * cos_stride_s
    sin = sin_ptr + b * cos_stride_b + s * cos_stride_s
    q = _rotate(src, h * 3 * D, cos, sin, d, mask, R, False)
    k = _rotate(src, h * 3 * D + D, cos, sin, d, mask, R, False)
    v = tl.load(src + h * 3 * D + 2 * D + d, mask=mask)
    tl.store(q_ptr + dst, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + dst, v, mask=mask)


@triton.jit
def _backward_kernel(
    dqkv_ptr, dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, S, H, cos_stride_b, cos_stride_s,
    dq_strides_b, dq_strides_h, dq_strides_s, dk_strides_b, dk_strides_h, dk_strides_s,
    dv_strides_b, dv_strides_h, dv_strides_s,
    D: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    b, s = token // S, token % S
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < D)
    cos = cos_ptr + b * cos_stride_b + s * cos_stride_s
    sin = sin_ptr + b * cos_stride_b + s * cos_stride_s
    # The incoming gradients are [B, H, S, D] with whatever strides attention's backward gave them.
    dq = _rotate(dq_ptr + b * dq_strides_b + s * dq_strides_s, h * dq_strides_h, cos, sin, d, mask, R, True)
    dk = _rotate(dk_ptr + b * dk_strides_b + s * dk_strides_s, h * dk_strides_h, cos, sin, d, mask, R, True)
    dv = tl.load(dv_ptr + b * dv_strides_b + s * dv_strides_s + h * dv_strides_h + d, mask=mask)
    dst = dqkv_ptr + token * H * 3 * D + h * 3 * D + d
    tl.store(dst, dq.to(dqkv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + D, dk.to(dqkv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + 2 * D, dv, mask=mask)


class _SplitRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads):
        B, S, width = qkv.shape
        D = width // (3 * heads)
        R = cos.shape[-1]
        qkv = qkv.contiguous()
        cos, sin = cos.expand(B, S, R), sin.expand(B, S, R)  # one row of positions for the batch: stride 0
        q, k, v = (qkv.new_empty(B, S, heads, D) for _ in range(3))
        _forward_kernel[_grid(B * S, heads, D)](
            qkv, q, k, v, cos, sin, S, heads, cos.stride(0), cos.stride(1), D=D, R=R, **_blocks(heads, D)
        )
        ctx.save_for_backward(cos, sin)
        ctx.shape = (B, S, heads, D, R)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        B, S, heads, D, R = ctx.shape
        dqkv = dq.new_empty(B, S, 3 * heads * D)
        strides = [x for g in (dq, dk, dv) for x in g.stride()[:3]]
        _backward_kernel[_grid(B * S, heads, D)](
            dqkv, dq, dk, dv, cos, sin, S, heads, cos.stride(0), cos.stride(1), *strides,
            D=D, R=R, **_blocks(heads, D),
        )  # fmt: skip
        return dqkv, None, None, None


def _blocks(heads: int, d: int) -> dict:
    """A program's tile: all of a head's channels (a power of 2 wide) and enough heads for ~2k elements."""
    block_d = triton.next_power_of_2(d)
    return {"BLOCK_D": block_d, "BLOCK_H": min(triton.next_power_of_2(heads), max(1, 2048 // block_d))}


def _grid(tokens: int, heads: int, d: int) -> tuple[int, int]:
    return tokens, triton.cdiv(heads, _blocks(heads, d)["BLOCK_H"])


def split_rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int):
    """(q, k, v), each [B, H, S, D], of GPT-NeoX's qkv projection output [B, S, 3·H·D]; q and k rotated by cos/sin
    [B, S, R] on their first R channels, as transformers' GPT-NeoX attention computes them."""
    return _SplitRotate.apply(qkv, cos.contiguous(), sin.contiguous(), heads)


def attention_forward(self, hidden_states, attention_mask, layer_past=None, position_embeddings=None, **kwargs):
    """GPTNeoXAttention.forward with `split_rotate` in place of its view, chunk and apply_rotary_pos_emb."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt_neox.modeling_gpt_neox import eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    cos, sin = position_embeddings
    heads = self.config.num_attention_heads
    query, key, value = split_rotate(self.query_key_value(hidden_states), cos, sin, heads)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        scaling=self.scaling,
        dropout=0.0 if not self.training else self.attention_dropout,
        **kwargs,
    )
    return self.dense(output.reshape(*input_shape, -1).contiguous()), weights
