"""The ZeRO-3 glue: every access to possibly-partitioned parameters goes through here.

Without DeepSpeed (or under ZeRO-2) these helpers are no-ops over ordinary tensors.
"""
from __future__ import annotations

import contextlib

import torch


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if is_partitioned(p) else p.numel()


def local_numel(p: torch.Tensor) -> int:
    """Elements of `p` this rank stores (its ZeRO-3 partition, or the whole tensor)."""
    return p.ds_tensor.numel() if is_partitioned(p) else p.numel()


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """Make full `params` available inside the block; gathers only those that are partitioned.

    With `modifier_rank`, changes that rank makes are re-partitioned on exit, so every ZeRO param is
    passed on, also one already available (else its shard would keep the old value). All ranks must enter.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in params if is_partitioned(p)
            and (modifier_rank is not None or p.ds_status == ZeroParamStatus.NOT_AVAILABLE)]
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(todo, modifier_rank=modifier_rank):
        yield


def zero3_enabled(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage") == 3
