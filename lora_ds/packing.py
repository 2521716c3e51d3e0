"""Packing: several examples per sequence, attention kept inside each example.

A packed row concatenates whole examples; its `position_ids` restart at 0 where each example starts,
which is all a model needs to tell the examples apart: `block_causal_mask` turns them into a 4-D
mask that is causal and never crosses an example boundary, and the same position ids give each
example the rotary/learned positions it would have alone. So every example's loss in a packed row
equals its loss run alone.
"""

from __future__ import annotations

_CONCATENATED = ("input_ids", "labels", "position_ids")


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of `capacity`, each item in the first bin it fits.

    A max-tree over the bins' free space finds that bin in O(log n). Bins are numbered in the order
    they are opened and items join in input order, so the result is deterministic and keeps order.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * (2 * size)  # free[size + b] = room left in bin b; unopened bins have `capacity`
    for b in range(size):
        free[size + b] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        node = 1
        while node < size:  # descend to the leftmost bin with room for n
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_rows(rows: list[dict], pack_len: int) -> list[dict]:
    """Greedy first-fit packing of whole examples into rows of at most `pack_len` tokens.

    Each row of `rows` has input_ids, labels, position_ids (0..n-1) and id. A packed row holds
    their concatenations, its examples in input order, `id` the ids joined by "," and `length`.
    An example is never split: one longer than `pack_len` is a ValueError.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    too_long = [i for i, n in enumerate(lengths) if n > pack_len]
    if too_long:
        raise ValueError(
            f"example {rows[too_long[0]]['id']} has {lengths[too_long[0]]} tokens, more than the pack length {pack_len}"
        )
    packed = []
    for members in _first_fit(lengths, pack_len):
        row = {key: [t for i in members for t in rows[i][key]] for key in _CONCATENATED}
        row["id"] = ",".join(rows[i]["id"] for i in members)
        row["length"] = len(row["input_ids"])
        packed.append(row)
    return packed


def block_causal_mask(position_ids, attention_mask, dtype):
    """The [B, 1, L, L] mask under which token i sees token j iff j <= i, both lie in the same example
    and j is not padding.

    Examples are the runs of `position_ids` [B, L] that start at 0; `attention_mask` [B, L] is 1 on
    real tokens, 0 on padding. transformers passes a 4-D mask to the attention as it is: with a float
    `dtype` it is additive (0 where allowed, the dtype's minimum elsewhere), which both the "eager"
    and "sdpa" attentions of GPT-NeoX and Llama accept (for sdpa, use the model's dtype); with
    `torch.bool` it is True where allowed, which sdpa accepts but eager does not. A padding token
    sees only itself, so no row of the softmax is empty (its output is never used).
    """
    import torch

    example = torch.cumsum((position_ids == 0).long(), dim=-1)  # [B, L]: which example each token is in
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    same = example[:, :, None] == example[:, None, :]
    real_key = attention_mask.bool()[:, None, :]
    itself = torch.eye(length, dtype=torch.bool, device=position_ids.device)
    allowed = ((causal & same & real_key) | itself)[:, None, :, :]
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
