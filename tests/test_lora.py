"""The LoRA layer and injection: invariants on tiny modules, and PEFT as the oracle for GPT-2's Conv1D."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_ds.adapter import peft_config, read_adapter, write_adapter
from lora_ds.errors import UserError
from lora_ds.lora import LoRALinear, inject_lora, lora_modules, lora_parameters


def conv1d(in_features, out_features):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(out_features, in_features)
    nn.init.normal_(layer.weight)
    return layer


BASES = {"linear": lambda: nn.Linear(12, 10), "conv1d": lambda: conv1d(12, 10)}


def trained_layer(kind: str, rslora: bool = False) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(BASES[kind](), r=3, alpha=6, rslora=rslora)
    nn.init.normal_(layer.lora_B.weight)
    return layer


@pytest.mark.parametrize("kind", sorted(BASES))
def test_fresh_layer_reproduces_base_exactly(kind):
    torch.manual_seed(0)
    base = BASES[kind]()
    x = torch.randn(4, 12)
    expected = base(x)
    layer = LoRALinear(base, r=3, alpha=6)
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) == 36


@pytest.mark.parametrize("kind", sorted(BASES))
def test_output_is_base_plus_scaled_low_rank_update(kind):
    layer = trained_layer(kind)
    x = torch.randn(4, 12)
    w0 = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
    expected = x @ w0.T + layer.base_layer.bias + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    assert layer.delta_weight().shape == layer.base_layer.weight.shape


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("check", ["merged_equals_unmerged", "merge_idempotent", "unmerge_restores"])
def test_merge_invariants(kind, check):
    layer = trained_layer(kind)
    x = torch.randn(4, 12)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    if check == "merged_equals_unmerged":
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    elif check == "merge_idempotent":
        merged_w = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert torch.equal(layer.base_layer.weight, merged_w)
    else:
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_train_and_eval_modes_never_merge():
    layer = trained_layer("linear")
    w0 = layer.base_layer.weight.detach().clone()
    layer.eval()
    layer.train()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_merge_refuses_non_finite_adapters():
    layer = trained_layer("linear")
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        layer.merge()


def test_rslora_scale_is_alpha_over_sqrt_r():
    assert trained_layer("linear", rslora=True).scaling == pytest.approx(6 / 3 ** 0.5)
    assert trained_layer("linear").scaling == 2.0


def tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ds.model import PRESETS

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **PRESETS[
        f"tiny-{model_type.replace('_', '-')}"][1]))


@pytest.mark.parametrize("model_type,targets,count", [
    ("gpt_neox", ["query_key_value"], 2), ("llama", ["q_proj", "v_proj"], 4), ("gpt2", ["c_attn"], 2),
    ("llama", "re:.*layers\\.1\\..*(q|k|v|o)_proj", 4), ("llama", ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"], 14)])
def test_injection_freezes_base_and_wraps_targets(model_type, targets, count):
    from lora_ds.config import LoraConfig

    model = tiny(model_type)
    spec = LoraConfig(r=2, targets=targets).target_spec()
    names = inject_lora(model, spec, r=2, alpha=4)
    assert len(names) == len(lora_modules(model)) == count
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}.weight" for n in names for part in ("lora_A", "lora_B")}
    assert set(lora_parameters(model)) == trainable


def test_same_seed_gives_same_adapter_whatever_rng_was_consumed():
    a, b = tiny("gpt_neox"), tiny("gpt_neox")
    inject_lora(a, ["query_key_value"], 4, 8, seed=11)
    torch.randn(1000)
    inject_lora(b, ["query_key_value"], 4, 8, seed=11)
    for (name, pa), pb in zip(lora_parameters(a).items(), lora_parameters(b).values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=["nonexistent"]), "matches no Linear/Conv1D module"),
    (dict(r=0), "lora.r 0: the rank"), (dict(alpha=-1.0), "lora.alpha -1.0"), (dict(dropout=1.5), "lora.dropout"),
    (dict(r=2.5), "lora.r 2.5: expected an integer"),
])
def test_bad_lora_settings_fail_before_training(kwargs, message):
    args = dict(targets=["query_key_value"], r=4, alpha=8.0, dropout=0.0) | kwargs
    with pytest.raises(UserError, match=message):
        inject_lora(tiny("gpt_neox"), args["targets"], args["r"], args["alpha"], args["dropout"])


def test_gpt2_conv1d_adapter_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "base")
    inject_lora(model, ["c_attn"], 4, 8, seed=1)
    params = lora_parameters(model)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("lora_B.weight"):
                p.normal_(std=0.1)
    config = peft_config(r=4, alpha=8, dropout=0.0, target_modules=["c_attn"], use_rslora=False,
                         fan_in_fan_out=True, base_model=str(tmp_path / "base"))
    write_adapter(str(tmp_path / "adapter"), {k: v for k, v in params.items()}, config)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded_config, loaded = read_adapter(str(tmp_path / "adapter"))
    assert loaded_config == config and sorted(loaded) == sorted(params)

    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (2, 10))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                               rtol=0, atol=1e-5)
