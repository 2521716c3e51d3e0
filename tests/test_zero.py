"""lora_ds/zero.py on DeepSpeed's own ZeRO-3 parameters, in a one-rank gloo group inside the test process."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def world_of_one():
    import deepspeed
    import torch.distributed as dist
    from helpers import CPU_ENV, free_port

    env = {**CPU_ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        deepspeed.init_distributed("gloo")
        yield
        dist.destroy_process_group()


class StreamClock:
    """The accelerator's current stream, counting synchronize() calls; the accelerator reporting, as CUDA's does,
    that it does not order work itself (the CPU accelerator does, so DeepSpeed never waits on it)."""

    def __init__(self, monkeypatch):
        from deepspeed.accelerator import get_accelerator

        self.waits = 0
        accelerator = get_accelerator()
        monkeypatch.setattr(accelerator, "resolves_data_dependency", lambda: False)
        monkeypatch.setattr(accelerator, "current_stream", lambda *a: self)

    def synchronize(self):
        self.waits += 1


def partitioned_linears(n: int) -> list[torch.nn.Linear]:
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        torch.manual_seed(0)
        return [torch.nn.Linear(8, 8) for _ in range(n)]


def fetch(weights, clock) -> int:
    """Waits for the stream while DeepSpeed fetches `weights` (waiting twice, as two modules of one fetch do);
    checks they hold their values, then partitions them again."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    expected = [w.ds_tensor.detach().clone().view(w.ds_shape) for w in weights]
    before = clock.waits
    handle = weights[0].all_gather_coalesced(weights)
    handle.wait()
    handle.wait()
    for w, value in zip(weights, expected):
        assert w.ds_status == ZeroParamStatus.AVAILABLE
        assert torch.equal(w.data, value)
        w.partition()
    return clock.waits - before


def test_a_world_of_one_fetches_a_resident_partition_without_waiting_for_the_stream(world_of_one, monkeypatch):
    from deepspeed.runtime.zero.partition_parameters import NoGatherHandle

    from lora_ds.zero import skip_resident_fetch_sync

    one, many = [layer.weight for layer in partitioned_linears(1)], [layer.weight for layer in partitioned_linears(3)]
    clock = StreamClock(monkeypatch)
    if not getattr(NoGatherHandle, "_lora_ds_resident_aware", False):  # not yet patched in this process
        assert fetch(one, clock) == fetch(many, clock) == 1  # DeepSpeed's own handles: a wait for the whole stream
    skip_resident_fetch_sync()
    assert fetch(one, clock) == fetch(many, clock) == 0


def test_an_optimizer_step_leaves_frozen_persistent_params_gathered_and_regathers_the_trained(world_of_one):
    """After keep_frozen_persistent_gathered, DeepSpeed's step neither partitions nor gathers again the frozen
    persistent params (a Linear's bias under the persistence threshold), which keep their values; the trained
    persistent param is released, updated and gathered with its new value, as without it; a weight left
    gathered is released."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from lora_ds.zero import keep_frozen_persistent_gathered

    keep_frozen_persistent_gathered()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 16},
    }
    with deepspeed.zero.Init(config_dict_or_path=config):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)  # model[1].bias (8 elements, persistent) is the one trained
    trained = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=config)
    frozen_bias, trained_bias = model[0].bias, model[1].bias
    assert frozen_bias.ds_persist and trained_bias.ds_persist and not model[0].weight.ds_persist
    calls = []
    frozen_bias.partition = lambda *a, _p=frozen_bias.partition, **k: calls.append("partition") or _p(*a, **k)
    engine.backward(engine(torch.randn(2, 8)).square().mean())  # DeepSpeed's first step records the module order
    engine.step()
    calls.clear()
    for _ in range(2):
        before = frozen_bias.data.clone(), trained_bias.data.clone()
        engine.backward(engine(torch.randn(2, 8)).square().mean())
        engine.step()
        assert frozen_bias.ds_status == trained_bias.ds_status == ZeroParamStatus.AVAILABLE
        assert torch.equal(frozen_bias.data, before[0]) and not torch.equal(trained_bias.data, before[1])
        assert torch.equal(trained_bias.data, trained_bias.ds_tensor.view(8))  # the update, gathered
    assert calls == []
    # A weight left gathered (as by a module whose release hook never fired) is released by the step.
    frozen_weight = model[0].weight
    engine.backward(engine(torch.randn(2, 8)).square().mean())
    frozen_weight.all_gather()
    assert frozen_weight.ds_status == ZeroParamStatus.AVAILABLE
    engine.step()
    assert frozen_weight.ds_status == ZeroParamStatus.NOT_AVAILABLE
    assert frozen_bias.ds_status == trained_bias.ds_status == ZeroParamStatus.AVAILABLE
    engine.destroy()
