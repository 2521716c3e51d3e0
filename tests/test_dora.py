"""DoRA (--use_dora): PEFT's DoRA as the oracle for the layer, its init, gradients, adapter files and merges."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fixtures import tiny_model as tiny

from lora_ds import merge
from lora_ds.adapter import LoRAWeights, peft_config, read_adapter, write_adapter
from lora_ds.config import parse_config
from lora_ds.errors import UserError
from lora_ds.eval_model import merge_lora
from lora_ds.lora import inject_lora, lora_modules, lora_parameters

# family -> (target, fan_in_fan_out): GPT-2's Conv1D holds its weight (in, out).
FAMILIES = {"gpt2": ("c_attn", True), "gpt_neox": ("query_key_value", False)}
R, ALPHA = 4, 8


def trained_dora(family: str):
    """(base, ours: the base with our DoRA layers, their non-trivial B and magnitudes)."""
    torch.manual_seed(0)
    base = tiny(family).eval()
    ours = copy.deepcopy(base)
    inject_lora(ours, [FAMILIES[family][0]], R, ALPHA, seed=1, use_dora=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lora_parameters(ours).items():
            if name.endswith("lora_B.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return base, ours.eval()


def dora_config(family: str, **changes) -> dict:
    target, fan_in_fan_out = FAMILIES[family]
    config = peft_config(
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=[target],
        use_rslora=False,
        fan_in_fan_out=fan_in_fan_out,
        base_model="base",
        use_dora=True,
    )
    return config | changes


def peft_of(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_magnitude_starts_at_peft_s_init_the_row_norms_of_w0(family):
    from peft import LoraConfig, get_peft_model

    base, _ = trained_dora(family)
    target, fan_in_fan_out = FAMILIES[family]
    ours = copy.deepcopy(base)
    inject_lora(ours, [target], R, ALPHA, use_dora=True)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[target], use_dora=True)
    )
    theirs = {k: v for k, v in peft_model.state_dict().items() if "lora_magnitude_vector" in k}
    modules = lora_modules(ours)
    assert len(modules) == len(theirs) == 2
    for name, module in modules:
        expected = theirs[f"base_model.model.{name}.lora_magnitude_vector.default.weight"]
        assert torch.equal(module.lora_magnitude_vector.detach(), expected)
        w0 = module.base_layer.weight
        assert torch.equal(expected, torch.linalg.vector_norm(w0, dim=0 if fan_in_fan_out else 1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_loads_in_peft_with_our_logits_and_gradients(family, tmp_path):
    base, ours = trained_dora(family)
    params = lora_parameters(ours)
    write_adapter(str(tmp_path / "adapter"), params, dora_config(family))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    config, tensors = read_adapter(str(tmp_path / "adapter"))
    assert config == saved and sorted(tensors) == sorted(params)
    theirs = peft_of(base, tmp_path / "adapter")
    x = ids()
    expected = ours(input_ids=x).logits
    assert torch.equal(theirs(input_ids=x).logits, expected)
    assert (expected - base(input_ids=x).logits).abs().max() > 0.1  # the adapter matters

    ours(input_ids=x, labels=x).loss.backward()
    for name, p in theirs.named_parameters():
        p.requires_grad_("lora_" in name)
    theirs(input_ids=x, labels=x).loss.backward()
    grads = {
        n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight"): p.grad
        for n, p in theirs.named_parameters()
        if p.grad is not None
    }
    assert len(grads) == len(params) == 6
    for name, p in params.items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, grads[name.removesuffix(".weight")], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_we_read_the_dora_adapter_peft_saves(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = trained_dora(family)
    target, fan_in_fan_out = FAMILIES[family]
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[target], use_dora=True, fan_in_fan_out=fan_in_fan_out),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    config, tensors = read_adapter(str(tmp_path / "peft"))
    assert config["use_dora"] is True and sum(k.endswith(".lora_magnitude_vector") for k in tensors) == 2
    ours = copy.deepcopy(base)
    inject_lora(ours, [target], R, ALPHA, use_dora=True)
    with torch.no_grad():
        for name, p in lora_parameters(ours).items():
            p.copy_(tensors[name])
    x = ids()
    assert torch.equal(ours.eval()(input_ids=x).logits, peft_model.eval()(input_ids=x).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_dir_equals_peft_s_merge_and_unload_block_by_block(family, tmp_path, monkeypatch):
    """`lora-ds merge` of a DoRA adapter: each row m/||W0 + s·B·A|| · (W0 + s·B·A), as PEFT's merge_and_unload;
    blocks of a few rows (GPT-2's (in, out) weight: its output norms span every block)."""
    from safetensors.torch import load_file

    base, ours = trained_dora(family)
    base.save_pretrained(tmp_path / "base")
    write_adapter(str(tmp_path / "adapter"), lora_parameters(ours), dora_config(family))
    monkeypatch.setattr(merge, "_BLOCK_BYTES", 4 * 64 * 5)  # 5 rows of 64 fp32 a block
    report = merge.merge_model_dir(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert report["merged_modules"] == 2
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    expected = peft_of(base, tmp_path / "adapter").merge_and_unload().state_dict()
    target = FAMILIES[family][0]
    changed = [k for k in merged if f".{target}.weight" in k]
    assert len(changed) == 2
    for key in changed:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
        assert (merged[key] - base.state_dict()[key]).abs().max() > 1e-2
    x = ids()
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=x).logits
    torch.testing.assert_close(out, ours(input_ids=x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_merge_equals_unmerged_and_unmerge_restores_w0(family):
    base, ours = trained_dora(family)
    x = ids()
    expected = ours(input_ids=x).logits
    modules = [m for _, m in lora_modules(ours)]
    for m in modules:
        m.merge()
        m.merge()  # idempotent
    torch.testing.assert_close(ours(input_ids=x).logits, expected, rtol=0, atol=1e-5)
    for m in modules:
        m.unmerge()
    for name, m in lora_modules(ours):
        torch.testing.assert_close(m.base_layer.weight, base.get_submodule(name).weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(input_ids=x).logits, expected, rtol=0, atol=1e-5)


def test_eval_merge_of_a_dora_adapter_gives_peft_s_logits(tmp_path):
    base, ours = trained_dora("gpt_neox")
    tensors = {k: v.detach().clone() for k, v in lora_parameters(ours).items()}
    write_adapter(str(tmp_path / "adapter"), tensors, dora_config("gpt_neox"))
    evaluated = copy.deepcopy(base)
    merged = merge_lora(evaluated, LoRAWeights(dora_config("gpt_neox"), tensors, "adapter"))
    assert len(merged) == 2 and not lora_modules(evaluated)
    x = ids()
    torch.testing.assert_close(
        evaluated(input_ids=x).logits, peft_of(base, tmp_path / "adapter")(input_ids=x).logits, rtol=0, atol=1e-5
    )


BROKEN = {
    "use_dora without magnitudes": (
        lambda t: {k: v for k, v in t.items() if not k.endswith("magnitude_vector")},
        {},
        "has no lora_magnitude_vector, but adapter_config.json says use_dora = True",
    ),
    "magnitudes without use_dora": (
        lambda t: t,
        {"use_dora": False},
        r"has a lora_magnitude_vector \(DoRA\), but adapter_config.json says use_dora = False",
    ),
    "magnitude of the wrong size": (
        lambda t: {k: v[:-1] if k.endswith("magnitude_vector") else v for k, v in t.items()},
        {},
        r"lora_magnitude_vector \[191\], but lora_B has 192 output features",
    ),
    "use_dora not a bool": (lambda t: t, {"use_dora": "yes"}, "field 'use_dora' must be true or false"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_inconsistent_dora_adapters_are_refused(case, tmp_path):
    change, config_changes, message = BROKEN[case]
    _, ours = trained_dora("gpt_neox")
    tensors = change({k: v.detach() for k, v in lora_parameters(ours).items()})
    config = dora_config("gpt_neox")
    write_adapter(str(tmp_path / "ok"), {k: v.detach() for k, v in lora_parameters(ours).items()}, config)
    from safetensors.torch import save_file

    save_file(
        {"base_model.model." + k: v.contiguous() for k, v in tensors.items()},
        tmp_path / "ok" / "adapter_model.safetensors",
    )
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(config | config_changes))
    with pytest.raises(UserError, match=message):
        read_adapter(str(tmp_path / "ok"))


def test_use_dora_flag():
    assert parse_config(["--use_dora"]).lora.use_dora is True
    assert parse_config([]).lora.use_dora is False
