"""Training data: encoding (prompt, completion) pairs, reading prepared dirs and JSONL, batching.

A prepared directory (written by `lora-ds prep`, data_prep/) is a `datasets` Arrow dataset saved with
`save_to_disk` plus `manifest.json`. Its rows have `input_ids`, `labels` (-100 over the context) and
`position_ids` (restarting at 0 where a packed example starts); other columns are ignored here.
"""
from __future__ import annotations

IGNORE_INDEX = -100


def encode_pair(tok, prompt: str, completion: str, max_len: int | None = None, truncate: bool = True):
    """Ids and labels of one example: [BOS] prompt completion EOS, loss on completion + EOS only.

    An overlong example loses context tokens from the left (never target tokens); with `truncate`
    False, or when the target alone does not fit, None is returned (the example is dropped).
    Returns (row, truncated) where row has input_ids, labels, position_ids.
    """
    context = ([tok.bos_token_id] if tok.add_bos else []) + tok.encode(prompt)
    target = tok.encode(completion) + [tok.eos_token_id]
    truncated = False
    if max_len is not None and len(context) + len(target) > max_len:
        room = max_len - len(target)
        if not truncate or room < 1:
            return None, False
        keep_bos = 1 if tok.add_bos else 0
        context = context[:keep_bos] + context[len(context) - (room - keep_bos):]
        truncated = True
    ids = context + target
    row = {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * len(context) + target,
        "position_ids": list(range(len(ids))),
    }
    return row, truncated
