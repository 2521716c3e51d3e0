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


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of `p` whole, also while ZeRO-3 holds only a partition of it."""
    return p.ds_shape if is_partitioned(p) else p.shape


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

    todo = [
        p
        for p in params
        if is_partitioned(p) and (modifier_rank is not None or p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
    ]
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(todo, modifier_rank=modifier_rank):
        yield


def zero3_enabled(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage") == 3


def fetch_by_layer(model) -> int:
    """Make each decoder layer (the classes transformers lists in `model._no_split_modules`) one ZeRO-3 fetch unit:
    one hook gathers all of its weights before its forward and its backward and releases them after, instead
    of a hook per Linear, norm and LoRA factor. Call before the engine is built. Returns the number of layers."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = list(getattr(model, "_no_split_modules", None) or [])
    layers = set_z3_leaf_modules(model, classes, raise_if_not_found=False) if classes else []
    if layers:
        # DeepSpeed reduces a fetch unit's gradients in its module backward hook, which fires at the start of its
        # backward when no input needs a gradient (the first layer: frozen embeddings), before they exist.
        # An embedding output that asks for one costs the first layer's input-gradient GEMMs, nothing else.
        model.enable_input_require_grads()
    return len(layers)


def keep_frozen_persistent_gathered() -> None:
    """Let ZeRO-3's release of every parameter at each optimizer step leave the frozen persistent ones gathered,
    and visit only the modules holding a parameter to release.

    DeepSpeed partitions every parameter at the start of `step()` and all-gathers the persistent ones again at its
    end, so that the optimizer's update reaches them. The frozen ones (the base's norms and biases under
    `stage3_param_persistence_threshold`) never change, yet cost a partition and a gather each step: on a 32-layer
    model ~260 of the ~320 persistent params. The release also walks every module and parameter three times
    (~6 ms of host time a step for 32 layers) before the step's first kernel, while the GPU, drained by the
    gradient epilogue's wait, idles. Here each step releases the modules that own a parameter still gathered
    (the trained LoRA factors, modules_to_save, anything a hook left), as DeepSpeed releases them; the root's
    external parameters, if one is gathered, go through DeepSpeed's full release.
    """
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if getattr(DeepSpeedZeRoOffload, "_lora_ds_keeps_frozen", False):
        return
    partition_all = DeepSpeedZeRoOffload.partition_all_parameters
    released = ZeroParamStatus.NOT_AVAILABLE

    def partition_all_parameters(self, _partition_all=partition_all):
        available = ZeroParamStatus.AVAILABLE
        kept = [p for p in self.persistent_parameters if not p.requires_grad and p.ds_status == available]
        for p in kept:  # seen as released: DeepSpeed's release skips them and its checks pass
            p.ds_status = released
        try:
            if any(p.ds_status != released for _, p in self.module.ds_external_parameters()):
                return _partition_all(self)
            if not hasattr(self, "_lora_ds_owners"):  # the modules and their own params, fixed once built
                self._lora_ds_owners = [
                    (m, [p for p in m._parameters.values() if p is not None]) for m in self.module.modules()
                ]
            coordinator = self.get_param_coordinator()
            for module, params in self._lora_ds_owners:
                if any(p.ds_status != released for p in params):
                    coordinator.release_and_reset_all(module)
        finally:
            for p in kept:
                p.ds_status = available

    DeepSpeedZeRoOffload.partition_all_parameters = partition_all_parameters
    DeepSpeedZeRoOffload._lora_ds_keeps_frozen = True


def skip_resident_fetch_sync() -> None:
    """Let DeepSpeed's fetch of a partition that is the whole weight (partition world of one: a single GPU) skip
    its wait for the whole CUDA stream when the partition is already on the device.

    With one rank ZeRO-3 "gathers" a weight by pointing it at its partition (`NoGatherHandle`), then calls
    `current_stream().synchronize()` for the non-blocking copy from CPU that only parameter offload makes. On a
    GPU-resident partition there is no copy, yet every fetch stalls the host until the GPU drains: on one H200,
    four times a decoder layer (forward and backward), 184 host syncs a step on gpt-neox-20b and ~11 % of the step
    idle. A quantized partition (dequantized on the gather stream) or one in CPU memory still waits. Several
    ranks gather with collectives whose handles never stalled the host; this changes nothing there.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import partition_parameters

    for cls in (partition_parameters.NoGatherHandle, partition_parameters.NoGatherCoalescedHandle):
        if getattr(cls, "_lora_ds_resident_aware", False):
            continue
        init, wait = cls.__init__, cls.wait

        def __init__(self, params, *args, _init=init, **kwargs):
            device = torch.device(get_accelerator().current_device_name())
            self._lora_ds_resident = all(
                p.ds_tensor.device == device and not hasattr(p.ds_tensor, "ds_quant_scale")
                for p in (params if isinstance(params, list) else [params])
            )
            _init(self, params, *args, **kwargs)

        def wait_(self, *args, _wait=wait, **kwargs):
            if not self._lora_ds_resident:
                return _wait(self, *args, **kwargs)
            accelerator = get_accelerator()
            shadowed = accelerator.__dict__.get("resolves_data_dependency")
            accelerator.resolves_data_dependency = lambda: True  # for this one call
            try:
                return _wait(self, *args, **kwargs)
            finally:
                if shadowed is None:
                    del accelerator.resolves_data_dependency
                else:
                    accelerator.resolves_data_dependency = shadowed

        cls.__init__, cls.wait, cls._lora_ds_resident_aware = __init__, wait_, True
