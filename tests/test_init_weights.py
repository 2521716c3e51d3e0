"""--init_lora_weights gaussian|pissa|pissa_niter_N|olora: PEFT's own init as the oracle, and PEFT's conversion of a
PiSSA/OLoRA adapter to a plain LoRA of the original base (save_pretrained(path_initial_model_for_weight_conversion))
as the oracle of ours. The 2-rank ZeRO-3 run (train, resume, export, PEFT, merge) is in test_train_distributed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fixtures import tiny_model as tiny

from lora_ds import merge
from lora_ds.adapter import peft_config, read_adapter, to_original_base, write_adapter
from lora_ds.checkpoint import check_resumable
from lora_ds.config import FieldError, RunConfig, parse_config
from lora_ds.errors import UserError
from lora_ds.lora import init_factors, inject_lora, lora_modules, lora_parameters

# family -> (target, fan_in_fan_out): GPT-2's Conv1D holds its weight (in, out).
FAMILIES = {"gpt2": ("c_attn", True), "gpt_neox": ("query_key_value", False)}
R, ALPHA, SEED = 4, 8, 5
# Layer 1 at rank 2, layer 0 at alpha 4 (the conversion doubles both patterns).
PATTERNS = {"gpt2": {r"h\.1\.attn\.c_attn": 2}, "gpt_neox": {r"layers\.1\.attention\.query_key_value": 2}}
ALPHA_PATTERNS = {"gpt2": {r"h\.0\.attn\.c_attn": 4.0}, "gpt_neox": {r"layers\.0\.attention\.query_key_value": 4.0}}
CASES = [
    (family, init)
    for family in sorted(FAMILIES)
    for init in ("gaussian", "pissa", "pissa_niter_2", "olora")
    if not (family == "gpt2" and init == "olora")  # refused: see test_refusals
]


def peft_lora_config(family: str, init, **changes):
    from peft import LoraConfig

    target, fan_in_fan_out = FAMILIES[family]
    kwargs = dict(r=R, lora_alpha=ALPHA, target_modules=[target], fan_in_fan_out=fan_in_fan_out, rank_pattern={})
    return LoraConfig(init_lora_weights=init, **(kwargs | changes))


def ours_and_peft(family: str, init, **changes):
    """(base, ours, PEFT's model) from the same base and seed."""
    from peft import get_peft_model

    base = tiny(family).eval()
    ours = copy.deepcopy(base)
    target = FAMILIES[family][0]
    inject_lora(ours, [target], R, ALPHA, seed=SEED, init_lora_weights=init, **changes)
    torch.manual_seed(SEED)  # inject_lora draws from a generator seeded so
    theirs = get_peft_model(copy.deepcopy(base), peft_lora_config(family, init, **changes))
    return base, ours.eval(), theirs.eval()


def train(model) -> None:
    """Move every factor off its init, as training would."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(lora_parameters(model).items()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def our_config(family: str, init: str, **changes) -> dict:
    target, fan_in_fan_out = FAMILIES[family]
    kwargs = dict(r=R, alpha=ALPHA, dropout=0.0, target_modules=[target], use_rslora=False)
    return peft_config(**kwargs, fan_in_fan_out=fan_in_fan_out, base_model="base", init_lora_weights=init, **changes)


@pytest.mark.parametrize("family,init", CASES)
def test_init_equals_peft_s_on_the_same_weights_and_pissa_olora_start_at_the_base(family, init):
    base, ours, theirs = ours_and_peft(family, init, rank_pattern=PATTERNS[family])
    state = theirs.state_dict()
    modules = lora_modules(ours)
    assert len(modules) == 2 and {m.r for _, m in modules} == {R, 2}
    for name, m in modules:
        for factor in ("lora_A", "lora_B"):
            assert torch.equal(getattr(m, factor).weight, state[f"base_model.model.{name}.{factor}.default.weight"])
        residual = state[f"base_model.model.{name}.base_layer.weight"]
        assert torch.equal(m.base_layer.weight, residual), name  # W0 - s·B0·A0, bitwise PEFT's
        changed = (residual - base.get_submodule(name).weight).abs().max().item()
        assert (changed > 1e-2) == (init != "gaussian")
    x = ids()
    expected = base(input_ids=x).logits
    torch.testing.assert_close(ours(input_ids=x).logits, expected, rtol=0, atol=1e-5)
    assert len(init_factors(ours)) == (0 if init == "gaussian" else 4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_residual_model_starts_at_the_bf16_base(init):
    base = tiny("gpt_neox").to(torch.bfloat16).eval()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["query_key_value"], R, ALPHA, seed=SEED, init_lora_weights=init)
    for _, m in lora_modules(ours):
        assert m.base_layer.weight.dtype == m.lora_A.weight.dtype == torch.bfloat16
        A0, B0 = m.init_factors
        assert A0.dtype == torch.float32 and torch.equal(A0, m.lora_A.weight.float())  # the factors as held
    x = ids()
    expected = base(input_ids=x).logits.float()
    assert (ours(input_ids=x).logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_gaussian_draws_a_with_std_one_over_r():
    model = tiny("gpt_neox")
    inject_lora(model, ["query_key_value"], 32, 8, seed=1, init_lora_weights="gaussian")
    for name, p in lora_parameters(model).items():
        if "lora_A" in name:
            assert abs(p.std().item() * 32 - 1) < 0.05
        else:
            assert not p.any()


@pytest.mark.parametrize("family,init", [c for c in CASES if c[1] != "gaussian"])
def test_converted_adapter_is_peft_s_conversion_and_applies_to_the_original_base(family, init, tmp_path):
    """PEFT's documented workflow: save the initial adapter (init_lora_weights set to true), train, then
    save_pretrained(path_initial_model_for_weight_conversion=it). Our conversion writes the same files, and the
    adapter on the ORIGINAL base gives the trained residual model's logits, in PEFT and merged by lora-ds merge."""
    from peft import PeftModel
    from safetensors.torch import load_file

    patterns = dict(rank_pattern=PATTERNS[family], alpha_pattern=ALPHA_PATTERNS[family])
    base, ours, theirs = ours_and_peft(family, init, **patterns)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "peft_init")
    theirs.peft_config["default"].init_lora_weights = init
    train(ours)
    with torch.no_grad():
        for name, p in lora_parameters(ours).items():
            theirs.get_parameter(f"base_model.model.{name[: -len('weight')]}default.weight").copy_(p)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))

    tensors, config = to_original_base(lora_parameters(ours), our_config(family, init, **patterns), init_factors(ours))
    write_adapter(str(tmp_path / "ours"), tensors, config)
    peft_saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert config[key] == peft_saved[key], key
    assert (config["r"], config["init_lora_weights"]) == (2 * R, True)
    expected = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected) and len(got) == 4
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)

    x = ids()
    trained = ours(input_ids=x).logits
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_model(input_ids=x).logits, trained, rtol=0, atol=1e-5)
    assert (trained - base(input_ids=x).logits).abs().max() > 1e-2  # training mattered

    base.save_pretrained(tmp_path / "base")
    merge.merge_model_dir(str(tmp_path / "base"), str(tmp_path / "ours"), str(tmp_path / "merged"))
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    oracle = peft_model.merge_and_unload().state_dict()
    common = sorted(set(merged) & set(oracle))  # a tied head is in only one of them
    assert sum(f".{FAMILIES[family][0]}.weight" in k for k in common) == 2 and len(common) >= len(merged) - 1
    for key in common:
        torch.testing.assert_close(merged[key], oracle[key], rtol=0, atol=1e-6, msg=key)


def test_an_unconverted_peft_pissa_adapter_is_refused(tmp_path):
    """PEFT saved without the conversion: its factors belong to the residual base PEFT recomputes at load time,
    so merging them into the original base would be wrong."""
    _, _, theirs = ours_and_peft("gpt_neox", "pissa")
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(UserError, match=r"init_lora_weights is 'pissa': these factors apply to a residual base"):
        read_adapter(str(tmp_path / "peft"))


REFUSED = {
    "dora": (["--init_lora_weights", "pissa", "--use_dora"], "DoRA with PiSSA/OLoRA is not supported"),
    "rslora with a pattern": (
        ["--init_lora_weights", "olora", "--rslora", "--lora_alpha_pattern", "q=2"],
        "PiSSA/OLoRA with rsLoRA and a rank or alpha pattern cannot be converted",
    ),
    "unknown": (["--init_lora_weights", "loftq"], "choose default, gaussian, pissa, olora or pissa_niter_N"),
    "bad niter": (["--init_lora_weights", "pissa_niter_x"], "choose default"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_combinations_peft_refuses_or_cannot_convert_are_refused_naming_the_flag(case):
    argv, message = REFUSED[case]
    with pytest.raises(UserError, match=rf"^--init_lora_weights \S+: {message}"):
        parse_config(argv)


def test_rslora_without_patterns_and_gaussian_dora_are_accepted():
    assert parse_config(["--init_lora_weights", "pissa", "--rslora"]).lora.init_lora_weights == "pissa"
    assert parse_config(["--init_lora_weights", "gaussian", "--use_dora"]).lora.use_dora
    assert parse_config(["--init_lora_weights", "pissa_niter_4"]).lora.init_lora_weights == "pissa_niter_4"
    assert parse_config([]).lora.init_lora_weights == "default"


@pytest.mark.parametrize(
    "family,init,changes,message",
    [
        ("gpt2", "olora", {}, r"lora.init_lora_weights olora: transformer.h.0.attn.c_attn is a GPT-2 Conv1D"),
        ("gpt_neox", "pissa", {"r": 65}, r"lora.r 65: pissa takes r singular vectors .* at most 64"),
        (
            "gpt_neox",
            "olora",
            {"rank_pattern": {r"layers\.0\..*": 80}},
            r"lora.rank_pattern 80: olora takes r singular vectors",
        ),
    ],
)
def test_what_peft_gets_wrong_at_init_is_refused(family, init, changes, message):
    """PEFT silently keeps fewer factors than r when r > min(in, out), and decomposes GPT-2's (in, out) weight
    untransposed in OLoRA (factors of the wrong shapes)."""
    kwargs = {"r": R, **changes}
    with pytest.raises(FieldError, match=message):
        inject_lora(tiny(family), [FAMILIES[family][0]], kwargs.pop("r"), ALPHA, init_lora_weights=init, **kwargs)


def test_resume_with_another_init_or_another_olora_alpha_is_refused(tmp_path):
    saved = parse_config(["--init_lora_weights", "olora"]).to_dict()
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    defaults = RunConfig().to_dict()
    check_resumable(str(tmp_path), saved, defaults)
    for argv, flag in (
        ([], "--init_lora_weights 'olora'"),
        (["--init_lora_weights", "olora", "--lora_alpha", "4"], "--lora_alpha 16.0"),
    ):
        with pytest.raises(UserError, match=f"was trained with {flag}, this run gives"):
            check_resumable(str(tmp_path), parse_config(argv).to_dict(), defaults)
