"""QLoRA (--quantize nf4): the frozen base in bitsandbytes' 4-bit NF4 (its CPU backend here), PEFT's LoRA on
bitsandbytes layers as the oracle of the layer, a real 2-rank ZeRO-3 run partitioning the packed weights."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from helpers import (
    PROGRAMS,
    adapter_tensors,
    assert_close_tensors,
    assert_equal_tensors,
    fork_trainer,
    launch,
    launch_together,
    peft_trainable,
    read_reports,
    reference_lora,
    run_cli,
    train_args,
)

from lora_ds.lora import inject_lora, lora_parameters
from lora_ds.model import preset_config
from lora_ds.quantize import bnb_config, build_preset, dense_weight, is_quantized
from lora_ds.tokenizer import load_tokenizer

bnb = pytest.importorskip("bitsandbytes")

R, ALPHA = 4, 8
COMMON = dict(micro_batch=4, grad_accum=2, lora_r=R, lora_alpha=ALPHA, lr=1e-2, warmup=2, seed=7, max_len=128)


def quantized(model_dir, dtype=torch.float32):
    """transformers' own 4-bit load of `model_dir`, as lora-ds asks for it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=bnb_config(dtype), device_map={"": "cpu"}
    )


@pytest.mark.parametrize("preset", ["tiny-gpt-neox", "tiny-llama3", "tiny-gemma2"])
def test_preset_built_module_by_module_initialises_as_from_config_and_quantizes_as_transformers_4bit_load(
    preset, tmp_path
):
    """`build_preset` (presets' path) gives from_config's model, buffers and init (Gemma's zero-centred norms,
    Llama 3.2's tied head), and, quantizing, the weights, codes and all, of transformers' 4-bit load of it."""
    from transformers import AutoModelForCausalLM

    config, kwargs, cpu = preset_config(preset), dict(dtype=torch.float32), torch.device("cpu")
    torch.manual_seed(0)
    plain = build_preset(config, kwargs, cpu, quantize=False)
    reference = AutoModelForCausalLM.from_config(config, **kwargs)
    assert plain.state_dict().keys() == reference.state_dict().keys()
    for name, buffer in reference.named_buffers():
        assert torch.equal(plain.get_buffer(name), buffer), name
    for name, p in reference.named_parameters():
        ours = plain.get_parameter(name)
        if p.std() == 0:  # norms and biases
            assert torch.equal(ours, p), name
        else:
            assert abs(ours.std() / p.std() - 1) < 0.1, name
    heads = plain.get_output_embeddings().weight, plain.get_input_embeddings().weight
    assert (heads[0] is heads[1]) == bool(config.tie_word_embeddings)

    plain.save_pretrained(tmp_path)
    theirs = quantized(tmp_path)
    torch.manual_seed(0)
    ours = build_preset(config, kwargs, cpu)
    names = [n for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert names == [n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert names and all("lm_head" not in n for n in names)
    for name in names:
        a, b = ours.get_submodule(name).weight, theirs.get_submodule(name).weight
        assert type(a) is type(b) is bnb.nn.Params4bit and a.dtype == torch.float32
        # Packed codes viewed as floats can be NaNs: compare the bytes.
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), name
        torch.testing.assert_close(dense_weight(a), dense_weight(b), rtol=0, atol=0)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_on_a_4bit_layer_equals_peft_s_bnb_lora(neox_dir, use_dora):
    """Our LoRALinear wrapping a bitsandbytes Linear4bit gives PEFT's loss and LoRA gradients (DoRA too: its
    magnitudes start from the dequantized weight's norms), and the quantization error is real."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ours = quantized(neox_dir)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query_key_value"], lora_dropout=0.0, use_dora=use_dora)
    peft_model = get_peft_model(quantized(neox_dir), config)
    inject_lora(ours, ["query_key_value"], R, ALPHA, seed=1, use_dora=use_dora)
    params = lora_parameters(ours)
    theirs = peft_trainable(peft_model)
    assert sorted(theirs) == sorted(params)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("magnitude_vector"):
                torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-6, msg=name)
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            theirs[name].copy_(p)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = ours(input_ids=ids, labels=ids).loss
    expected = peft_model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    full = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32)
    w = ours.gpt_neox.layers[0].attention.query_key_value.base_layer.weight
    assert is_quantized(w)
    error = (dense_weight(w) - full.gpt_neox.layers[0].attention.query_key_value.weight).abs().max().item()
    assert 1e-3 < error < 0.1


def test_olora_on_a_4bit_base_equals_peft_s_requantized_residual_and_starts_near_the_base(neox_dir):
    """--init_lora_weights olora with --quantize: the factors from the dequantized weight and the residual
    quantized anew are PEFT's (the same 4-bit codes), and step 0 is the 4-bit base up to that requantization."""
    from peft import LoraConfig, get_peft_model

    base = quantized(neox_dir)
    ours = quantized(neox_dir)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query_key_value"], init_lora_weights="olora")
    peft_model = get_peft_model(quantized(neox_dir), config)
    inject_lora(ours, ["query_key_value"], R, ALPHA, seed=1, init_lora_weights="olora")
    theirs = peft_trainable(peft_model)
    for name, p in lora_parameters(ours).items():
        torch.testing.assert_close(p, theirs[name], rtol=0, atol=0, msg=name)
    layer = ours.gpt_neox.layers[0].attention.query_key_value
    peft_layer = peft_model.base_model.model.gpt_neox.layers[0].attention.query_key_value
    original = base.gpt_neox.layers[0].attention.query_key_value.weight
    w = layer.base_layer.weight
    codes = w.data.view(torch.uint8)  # the packed codes (as floats they hold NaN patterns)
    assert is_quantized(w) and not torch.equal(codes, original.data.view(torch.uint8))
    assert torch.equal(codes, peft_layer.base_layer.weight.data.view(torch.uint8))
    assert torch.equal(w.quant_state.absmax, peft_layer.base_layer.weight.quant_state.absmax)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        torch.testing.assert_close(logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-6)
        drift = (logits - base(input_ids=ids).logits).abs().max().item()
    assert 1e-5 < drift < 0.1, drift  # the residual's own 4-bit rounding, not an exact start


def test_quantize_refuses_other_values_pissa_but_not_olora_and_a_missing_bitsandbytes(neox_dir, monkeypatch):
    from lora_ds.config import parse_config
    from lora_ds.errors import UserError
    from lora_ds.quantize import require_bitsandbytes

    with pytest.raises(UserError, match="quantize.*choose nf4"):
        parse_config(["--quantize", "int3"])
    with pytest.raises(UserError, match=r"--init_lora_weights pissa: .*4-bit; PEFT refuses PiSSA there"):
        parse_config(["--quantize", "nf4", "--init_lora_weights", "pissa"])
    assert parse_config(["--quantize", "nf4", "--init_lora_weights", "olora"]).lora.init_lora_weights == "olora"
    for init in ("pissa", "pissa_niter_2"):
        with pytest.raises(UserError, match=f"lora.init_lora_weights {init}: .*4-bit; PEFT refuses PiSSA there"):
            inject_lora(quantized(neox_dir), ["query_key_value"], R, ALPHA, seed=1, init_lora_weights=init)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"--quantize nf4 needs bitsandbytes .*lora-ds\[qlora\]"):
        require_bitsandbytes()


@pytest.mark.distributed
def test_qlora_trains_on_a_partitioned_4bit_base_resumes_bitwise_exports_and_merges_from_the_original(
    neox_dir, tmp_path
):
    """--quantize nf4 on 2 ranks: each rank holds half of every packed 4-bit weight, step 0 is transformers' 4-bit
    load; training equals the plain-PyTorch reference on that load (and not the full-precision one); a halted
    and resumed run is bit-identical; export-adapter of the shards is the trainer's adapter; PEFT on the 4-bit base
    gives our logits; merge writes the original base + s·B·A."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ds.consolidate import export_adapter

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = dict(max_steps=4, save_every=4, quantize="nf4", **COMMON)
    probe = ["--model", neox_dir, "--out", tmp_path, "--quantize", "nf4"]
    launch_together(
        dict(args=train_args(neox_dir, whole, **args)),
        dict(args=train_args(neox_dir, parts, halt_at_step=2, **args)),
        dict(args=probe, program=PROGRAMS / "zero3_probe.py"),
    )
    for report in read_reports(tmp_path, "probe", 2):
        assert report["quantized_params"] == 8  # the tiny model's 2 layers × 4 Linear
        assert report["base_params_fully_local"] == 0
        assert report["base_local_numel"] == report["base_expected_partition_numel"]
        assert report["optimizer_param_count"] == report["lora_param_count"]
        assert report["step0_max_abs_diff"] == 0.0
    assert "at step 2" in launch(train_args(neox_dir, parts, **args)).stdout
    # Resuming on the full-precision base would train another model from the checkpoint: refused.
    bf16_args = {k: v for k, v in args.items() if k != "quantize"}
    code, output = fork_trainer(train_args(neox_dir, parts, **bf16_args), tmp_path / "other.log")
    assert code == 2 and "was trained with --quantize 'nf4', this run gives None" in output
    ours = adapter_tensors(whole / "adapter")
    assert_equal_tensors(adapter_tensors(parts / "adapter"), ours)
    tok = load_tokenizer(str(neox_dir))
    steps = dict(steps=range(4), world=2, micro=4, accum=2, warmup=2, seed=7, r=R, alpha=ALPHA)
    ref = reference_lora(quantized(neox_dir), tok, ["query_key_value"], **steps)
    assert_close_tensors(ours, ref, rtol=1e-4, atol=3e-5)
    full = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32)
    unquantized = reference_lora(copy.deepcopy(full), tok, ["query_key_value"], **steps)
    assert max((v - unquantized[n]).abs().max().item() for n, v in ours.items()) > 1e-4
    export_adapter(str(whole / "checkpoints"), str(tmp_path / "exported"))
    assert_equal_tensors(adapter_tensors(tmp_path / "exported"), ours)

    live = quantized(neox_dir)
    inject_lora(live, ["query_key_value"], R, ALPHA, seed=7)
    with torch.no_grad():
        for name, p in lora_parameters(live).items():
            p.copy_(ours[name])
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(quantized(neox_dir), whole / "adapter").eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, live.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)

    assert_merge_from_the_original_base(neox_dir, whole / "adapter", tmp_path / "merged")
    assert json.loads((whole / "adapter" / "adapter_config.json").read_text())["r"] == R


@pytest.mark.distributed
def test_olora_on_a_4bit_base_trains_resumes_bitwise_exports_and_loads_in_peft(neox_dir, tmp_path):
    """--init_lora_weights olora --quantize nf4 on 2 ranks: a halted and resumed run equals the uninterrupted one
    bit for bit (the resume requantizes the same residual); export-adapter of the shards is the trainer's adapter,
    a rank-2r LoRA of the original base; PEFT's OLoRA on the 4-bit base with our trained factors gives the logits
    that adapter gives on the original 4-bit base, up to the residual's requantization; merge is PEFT's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = dict(max_steps=4, save_every=4, quantize="nf4", init_lora_weights="olora", **COMMON)
    launch_together(
        dict(args=train_args(neox_dir, whole, **args)),
        dict(args=train_args(neox_dir, parts, halt_at_step=2, **args)),
    )
    assert "at step 2" in launch(train_args(neox_dir, parts, **args)).stdout
    ours = adapter_tensors(whole / "adapter")
    assert_equal_tensors(adapter_tensors(parts / "adapter"), ours)
    exported = run_cli("export-adapter", "--checkpoint", parts / "checkpoints", "--out", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr
    assert_equal_tensors(adapter_tensors(tmp_path / "exported"), ours)
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (2 * R, True)

    # The trained model: PEFT's OLoRA residual (our codes: see above) with the trained factors, the first r of 2r.
    olora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query_key_value"], init_lora_weights="olora")
    trained_model = get_peft_model(quantized(neox_dir), olora).eval()
    with torch.no_grad():
        for name, p in peft_trainable(trained_model).items():
            p.copy_(ours[name][:R] if "lora_A" in name else ours[name][:, :R])
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(quantized(neox_dir), whole / "adapter").eval()
    with torch.no_grad():
        expected = trained_model(input_ids=ids).logits
        drift = (peft_model(input_ids=ids).logits - expected).abs().max().item()
    assert drift < 0.05, drift

    assert_merge_from_the_original_base(neox_dir, whole / "adapter", tmp_path / "merged")


def assert_merge_from_the_original_base(model_dir, adapter, out) -> None:
    """`lora-ds merge` of a QLoRA adapter writes PEFT's merge_and_unload of it on the full-precision base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = run_cli("merge", "--base", model_dir, "--adapter", adapter, "--out", out)
    assert merged.returncode == 0, merged.stderr
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    oracle = PeftModel.from_pretrained(full, adapter).merge_and_unload().state_dict()
    state = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for key, value in state.items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
