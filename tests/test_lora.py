"""The LoRA layer and injection: invariants on tiny modules, and PEFT as the oracle for GPT-2's Conv1D."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import tiny_model as tiny
from helpers import eval_tiny_wikisql, tiny_adapter_config
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
    assert trained_layer("linear", rslora=True).scaling == pytest.approx(6 / 3**0.5)
    assert trained_layer("linear").scaling == 2.0


@pytest.mark.parametrize(
    "model_type,targets,count",
    [
        ("gpt_neox", ["query_key_value"], 2),
        ("llama", ["q_proj", "v_proj"], 4),
        ("gpt2", ["c_attn"], 2),
        ("llama", "re:.*layers\\.1\\..*(q|k|v|o)_proj", 4),
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 14),
    ],
)
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


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(targets=["nonexistent"]), "matches no Linear/Conv1D module"),
        (dict(r=0), "lora.r 0: the rank"),
        (dict(alpha=-1.0), "lora.alpha -1.0"),
        (dict(dropout=1.5), "lora.dropout"),
        (dict(r=2.5), "lora.r 2.5: expected an integer"),
    ],
)
def test_bad_lora_settings_fail_before_training(kwargs, message):
    args = dict(targets=["query_key_value"], r=4, alpha=8.0, dropout=0.0) | kwargs
    with pytest.raises(UserError, match=message):
        inject_lora(tiny("gpt_neox"), args["targets"], args["r"], args["alpha"], args["dropout"])


def saved_base_with_lora(model, targets, base_dir, **patterns) -> dict:
    """Save `model` to `base_dir`, then give it LoRA factors (r 4, alpha 8) with a random B: its LoRA params."""
    model.save_pretrained(base_dir)
    inject_lora(model, targets, 4, 8, seed=1, **patterns)
    params = lora_parameters(model)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("lora_B.weight"):
                p.normal_(std=0.1)
    return params


def test_gpt2_conv1d_adapter_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    model = tiny("gpt2")
    params = saved_base_with_lora(model, ["c_attn"], tmp_path / "base")
    config = tiny_adapter_config(["c_attn"], tmp_path / "base", fan_in_fan_out=True)
    write_adapter(str(tmp_path / "adapter"), {k: v for k, v in params.items()}, config)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded_config, loaded = read_adapter(str(tmp_path / "adapter"))
    assert loaded_config == config and sorted(loaded) == sorted(params)

    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (2, 10))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the one definition of a valid adapter


def small_adapter(path, **config_overrides):
    """A valid two-module adapter dir (targets ["q"], r = 2), its config changed by `config_overrides`."""
    tensors = {
        f"model.layers.{i}.q.lora_{p}.weight": torch.full(shape, 0.1)
        for i in (0, 1)
        for p, shape in (("A", (2, 6)), ("B", (5, 2)))
    }
    config = peft_config(
        r=2, alpha=4, dropout=0.0, target_modules=["q"], use_rslora=False, fan_in_fan_out=False, base_model="t"
    )
    write_adapter(str(path), tensors, config)
    if config_overrides:
        (path / "adapter_config.json").write_text(json.dumps({**config, **config_overrides}))
    return tensors, config


def _edit_weights(change):
    def edit(path):
        from safetensors.torch import load_file, save_file

        state = load_file(path / "adapter_model.safetensors")
        change(state)
        save_file(state, path / "adapter_model.safetensors")

    return edit


def _nan(state):
    state["base_model.model.model.layers.0.q.lora_B.weight"][0, 0] = float("nan")


# case -> (edit of a valid adapter dir, message)
BAD_ADAPTERS = {
    "config not json": (lambda p: (p / "adapter_config.json").write_text("{"), r"adapter_config.json: not valid JSON"),
    "config not an object": (
        lambda p: (p / "adapter_config.json").write_text("[]"),
        r"adapter_config.json: expected a JSON object",
    ),
    "not lora": (lambda p: small_adapter(p, peft_type="IA3"), r"adapter_config.json: peft_type is 'IA3'"),
    "r = 0": (lambda p: small_adapter(p, r=0), r"adapter_config.json: field 'r' must be a positive integer, got 0"),
    "r = 2.5": (
        lambda p: small_adapter(p, r=2.5),
        r"adapter_config.json: field 'r' must be a positive integer, got 2.5",
    ),
    "no targets": (lambda p: small_adapter(p, target_modules=None), r"adapter_config.json: field 'target_modules'"),
    "other r": (
        lambda p: small_adapter(p, r=4),
        r"q has lora_A \[2, 6\] and lora_B \[5, 2\], but adapter_config.json "
        r"says r = 4",
    ),
    "other targets": (
        lambda p: small_adapter(p, target_modules=["k"]),
        r"module model.layers.0.q is not selected by "
        r"target_modules \['k'\]",
    ),
    "half a pair": (
        _edit_weights(lambda s: s.pop("base_model.model.model.layers.1.q.lora_A.weight")),
        r"model.layers.1.q has only one of lora_A / lora_B",
    ),
    "non-lora tensor": (
        _edit_weights(lambda s: s.update({"base_model.model.lm_head.weight": torch.ones(2)})),
        r"holds lm_head.weight, which is no LoRA tensor and no param of a module that adapter_config.json's "
        r"modules_to_save \(none\) selects",
    ),
    "nan": (_edit_weights(_nan), r"model.layers.0.q holds NaN/Inf"),
    "other rank_pattern": (
        lambda p: small_adapter(p, rank_pattern={r"layers\.1\.q": 3}),
        r"model.layers.1.q has lora_A \[2, 6\] and lora_B \[5, 2\], but adapter_config.json \(its rank_pattern\) "
        r"says r = 3",
    ),
    "rank_pattern 0": (
        lambda p: small_adapter(p, rank_pattern={"q": 0}),
        r"adapter_config.json: field 'rank_pattern' must map module regexes to positive values, got \['q=0'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_every_reader_refuses_a_bad_adapter_with_the_same_message(tmp_path, case, wikisql_file, capsys):
    """read_adapter, and through it merge, analyze and eval, apply one validator: one error per fault."""
    from lora_ds.analyze import analyze
    from lora_ds.eval_model import read_lora
    from lora_ds.merge import merge_model_dir

    edit, message = BAD_ADAPTERS[case]
    adapter = tmp_path / "adapter"
    small_adapter(adapter)
    edit(adapter)
    for read in (
        lambda: read_adapter(str(adapter)),
        lambda: read_lora(str(adapter), None),
        lambda: merge_model_dir(str(tmp_path), str(adapter), str(tmp_path / "merged")),
        lambda: analyze([str(adapter)], str(tmp_path / "analysis"), progress=False),
    ):
        with pytest.raises(UserError, match=message):
            read()
    assert eval_tiny_wikisql(wikisql_file, tmp_path / "eval", adapter=str(adapter)) == 2
    assert "lora-ds eval: error:" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("merged", "analysis", "eval"))


def test_write_adapter_refuses_tensors_its_config_does_not_describe(tmp_path):
    tensors, config = small_adapter(tmp_path / "good")
    with pytest.raises(UserError, match=r"bad: module model.layers.0.q is not selected by target_modules \['k'\]"):
        write_adapter(str(tmp_path / "bad"), tensors, {**config, "target_modules": ["k"]})
    with pytest.raises(UserError, match="--dtype int8: choose one of fp32, bf16, fp16"):
        write_adapter(str(tmp_path / "bad"), tensors, config, dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]


def test_eval_with_a_malformed_run_config_beside_the_adapter_is_a_clean_error(tmp_path, wikisql_file, capsys):

    adapter = tmp_path / "adapter"
    small_adapter(adapter)
    (adapter / "run_config.json").write_text('{"train": {"seed": 3},')
    assert eval_tiny_wikisql(wikisql_file, tmp_path / "eval", adapter=str(adapter)) == 2
    err = capsys.readouterr().err
    assert f"lora-ds eval: error: {adapter / 'run_config.json'}: not valid JSON" in err and "Traceback" not in err


def test_the_layer_and_the_adapter_config_agree_on_the_scale():
    from lora_ds.adapter import scaling

    for rslora in (False, True):
        layer = LoRALinear(nn.Linear(12, 10), r=3, alpha=6, rslora=rslora)
        assert scaling({"r": 3, "lora_alpha": 6, "use_rslora": rslora}) == layer.scaling


# ---------------------------------------------------------------- rank / alpha patterns and LoRA+, PEFT the oracle

QV = ["q_proj", "v_proj"]
# case -> (model type, targets, rank_pattern, alpha_pattern, rslora)
PATTERNS = {
    "rank and alpha": ("llama", QV, {r"layers\.0\.self_attn\.q_proj": 6, "v_proj": 2}, {"q_proj": 3.0}, False),
    "first key wins": ("llama", QV, {"q_proj": 2, r"layers\.0\..*": 6}, {}, False),
    "alpha alone uses r": ("llama", QV, {}, {r"layers\.1\.self_attn\.v_proj": 32.0}, False),
    "a suffix of dotted names": ("llama", QV, {"self_attn.q_proj": 5}, {}, False),
    "anchored at the start": ("llama", QV, {r"^model\.layers\.1\.self_attn\.q_proj": 3}, {}, False),
    "rslora": ("llama", QV, {"v_proj": 16}, {"v_proj": 4.0}, True),
    "fused qkv": ("gpt_neox", ["query_key_value"], {r"layers\.1\.attention\.query_key_value": 8}, {}, False),
}


@pytest.mark.parametrize("case", sorted(PATTERNS))
def test_rank_and_alpha_patterns_give_each_module_the_rank_and_scale_peft_gives_it(case):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model_type, targets, rank_pattern, alpha_pattern, rslora = PATTERNS[case]
    ours, theirs = tiny(model_type), tiny(model_type)
    inject_lora(ours, targets, 4, 8, rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    config = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=rslora,
    )
    peft_model = get_peft_model(theirs, config)
    expected = {
        name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for name, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    got = {name: (m.r, m.scaling) for name, m in lora_modules(ours)}
    assert got == expected
    assert len({r for r, _ in got.values()}) > 1 or alpha_pattern  # the case really varies the modules
    for name, param in lora_parameters(ours).items():
        assert param.shape == peft_model.get_parameter(f"base_model.model.{name[: -len('weight')]}default.weight").shape


@pytest.mark.parametrize(
    "patterns,message",
    [
        (dict(rank_pattern={"q_proj": 0}), r"lora.rank_pattern q_proj=0: the rank must be positive"),
        (dict(alpha_pattern={"q_proj": -1.0}), r"lora.alpha_pattern q_proj=-1.0: the alpha must be positive"),
        (dict(rank_pattern={"k_proj": 8}), r"lora.rank_pattern k_proj: selects none of the 4 adapted modules"),
        (dict(alpha_pattern={"proj": 8.0}), r"lora.alpha_pattern proj: selects none"),  # names end in q_proj
        (dict(rank_pattern={"q_proj(": 8}), r"lora.rank_pattern q_proj\(: not a regular expression"),
        (dict(rank_pattern={"q_proj": 2.5}), r"lora.rank_pattern .*: expected a mapping NAME=VALUE"),
    ],
)
def test_bad_patterns_are_refused_naming_the_field(patterns, message):
    """PEFT refuses a rank below 1 (when it builds the layer) and warns of a key that selects nothing; we refuse
    both before training, and a non-positive alpha as --lora_alpha is."""
    with pytest.raises(UserError, match=message):
        inject_lora(tiny("llama"), QV, 4, 8, **patterns)


def test_pattern_and_loraplus_settings_are_config_file_keys(tmp_path):
    from lora_ds.config import parse_config

    path = tmp_path / "run.yaml"
    lora = 'lora:\n  rank_pattern: {"layers\\\\.0\\\\..*": 16}\n  alpha_pattern: {v_proj: 4}\n'
    path.write_text(lora + "train:\n  loraplus_lr_ratio: 16\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.lora.rank_pattern, cfg.lora.alpha_pattern) == ({r"layers\.0\..*": 16}, {"v_proj": 4.0})
    assert cfg.train.loraplus_lr_ratio == 16.0
    path.write_text("lora:\n  rank_pattern: {q_proj: 0}\n")
    with pytest.raises(UserError, match=r"^--lora_rank_pattern q_proj=0 \(lora.rank_pattern in .*run.yaml\): the rank"):
        parse_config(["--config", str(path)])


def test_pattern_flags_parse_in_order_and_name_the_flag():
    from lora_ds.config import FieldError, as_flag_error, parse_config

    cfg = parse_config(["--lora_rank_pattern", r"layers\.0\..*=16, q_proj=2", "--lora-alpha-pattern", "v_proj=4"])
    assert list(cfg.lora.rank_pattern.items()) == [(r"layers\.0\..*", 16), ("q_proj", 2)]
    assert cfg.lora.alpha_pattern == {"v_proj": 4.0} and parse_config([]).lora.rank_pattern == {}
    with pytest.raises(UserError, match=r"^--lora_rank_pattern q_proj=0: the rank must be positive"):
        parse_config(["--lora_rank_pattern", "q_proj=0"])
    with pytest.raises(UserError, match=r"^--loraplus_lr_ratio 0.0: must be positive"):
        parse_config(["--loraplus_lr_ratio", "0"])
    with pytest.raises(FieldError) as raised:
        inject_lora(tiny("llama"), QV, 4, 8, rank_pattern={"k_proj": 8})
    assert str(as_flag_error(raised.value)).startswith("--lora_rank_pattern k_proj: selects none")


def test_patterned_adapter_round_trips_through_peft_with_our_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    patterns = dict(rank_pattern={r"layers\.0\.self_attn\.q_proj": 6, "v_proj": 2}, alpha_pattern={"q_proj": 3.0})
    model = tiny("llama")
    params = saved_base_with_lora(model, QV, tmp_path / "base", **patterns)
    config = tiny_adapter_config(QV, "b", **patterns)
    write_adapter(str(tmp_path / "adapter"), params, config)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["rank_pattern"], written["alpha_pattern"]) == (patterns["rank_pattern"], patterns["alpha_pattern"])
    assert read_adapter(str(tmp_path / "adapter"))[0] == config
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)


def _peft_name(name: str) -> str:
    """PEFT's parameter name of our LoRA parameter `name` (adapter "default")."""
    if name.endswith(".lora_magnitude_vector"):
        return f"base_model.model.{name}.default.weight"
    return f"base_model.model.{name[: -len('weight')]}default.weight"


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_loraplus_trains_as_peft_create_loraplus_optimizer_and_the_schedule_scales_both_groups(use_dora):
    """Our param groups (B, and DoRA's magnitudes, at lr × ratio) in build_optimizer's AdamW take the same steps as
    PEFT's LoRA+ optimizer from the same init; the warm-up/decay multiplier scales each group's own lr."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from lora_ds.engine import WarmupLinear, build_optimizer, param_groups

    lr, ratio, wd = 1e-2, 16.0, 0.1
    ours, theirs = tiny("llama"), tiny("llama")
    theirs.load_state_dict(ours.state_dict())
    inject_lora(ours, QV, 4, 8, seed=3, rank_pattern={"v_proj": 2}, use_dora=use_dora)
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=QV, rank_pattern={"v_proj": 2}, use_dora=use_dora)
    peft_model = get_peft_model(theirs, config)
    params = lora_parameters(ours)
    assert len(params) == 4 * (3 if use_dora else 2)
    with torch.no_grad():
        for name, p in params.items():
            peft_model.get_parameter(_peft_name(name)).copy_(p)
    opt = build_optimizer(param_groups(params, lr, ratio), lr, wd, {})
    oracle = create_loraplus_optimizer(
        peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd
    )
    assert [(g["lr"], len(g["params"])) for g in opt.param_groups] == sorted(
        (g["lr"], len(g["params"])) for g in oracle.param_groups if g["params"]
    )
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, WarmupLinear(1, 4)) for o in (opt, oracle)]
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, o, sched in ((ours, opt, scheds[0]), (peft_model, oracle, scheds[1])):
            o.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            o.step()
            sched.step()
    assert [g["lr"] for g in opt.param_groups] == [lr * WarmupLinear(1, 4)(3), lr * ratio * WarmupLinear(1, 4)(3)]
    for name, p in params.items():
        torch.testing.assert_close(p, peft_model.get_parameter(_peft_name(name)), rtol=0, atol=1e-6, msg=name)
    assert max(p.abs().max().item() for n, p in params.items() if "lora_B" in n) > 1e-2
