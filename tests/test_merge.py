"""`lora-ds merge`: PEFT's merge_and_unload as the oracle on tiny GPT-NeoX (fused QKV), Llama and GPT-2 (Conv1D)
models saved in several shards; layout, dtype, refusals, --verify, and the live in-place merge."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import save_tiny
from helpers import DEMO_TOKENIZER, tiny_adapter_config
from safetensors import safe_open
from safetensors.torch import load_file

from lora_ds.adapter import write_adapter
from lora_ds.cli import main
from lora_ds.errors import UserError
from lora_ds.lora import delta_weight, inject_lora, lora_parameters, merged_weight
from lora_ds.merge import INDEX_FILE, RECORD_FILE, merge_model_dir, merged_for_eval

TARGETS = {"gpt_neox": ["query_key_value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"]}
# Adapted modules per tiny model: 2 layers x targets (GPT-2's c_proj names both attn.c_proj and mlp.c_proj).
N_MODULES = {"gpt_neox": 2, "llama": 4, "gpt2": 6, "llama_patterns": 4}
# Llama's adapter again, with per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern).
PATTERNS = dict(rank_pattern={r"layers\.0\.self_attn\.q_proj": 6, "v_proj": 2}, alpha_pattern={"q_proj": 3.0})
VOCAB = 512


def base_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_adapter(model_dir: Path, targets, out: Path, seed: int = 1, patterns: dict | None = None, **config_overrides):
    """An adapter made by our inject_lora with a random (non-zero) B, and our model's logits with it;
    `patterns`: its rank_pattern / alpha_pattern."""
    patterns = patterns or {}
    model = base_model(model_dir)
    inject_lora(model, targets, r=4, alpha=8, seed=seed, **patterns)
    params = lora_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    fan_in_fan_out = any(getattr(m, "fan_in_fan_out", False) for m in model.modules())
    config = tiny_adapter_config(targets, model_dir, fan_in_fan_out=fan_in_fan_out, **patterns)
    write_adapter(str(out), params, {**config, **config_overrides})
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return out, logits


IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{model_type: (base dir in several shards, adapter dir, our logits with the adapter)}."""
    root = tmp_path_factory.mktemp("merge")
    out = {}
    for model_type, targets in TARGETS.items():
        base = save_tiny(
            model_type, VOCAB, root / model_type, tokenizer=DEMO_TOKENIZER if model_type == "gpt_neox" else None
        )
        adapter, logits = make_adapter(base, targets, root / f"{model_type}_adapter")
        out[model_type] = (base, adapter, logits)
    llama = out["llama"][0]
    out["llama_patterns"] = (
        llama,
        *make_adapter(llama, TARGETS["llama"], root / "patterned_adapter", patterns=PATTERNS),
    )
    return out


def safetensors_state(model_dir: Path) -> dict:
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.mark.parametrize("model_type", [*sorted(TARGETS), "llama_patterns"])
def test_merge_equals_peft_merge_and_unload_and_gives_our_logits(tiny, model_type, tmp_path):
    from peft import PeftModel

    base, adapter, our_logits = tiny[model_type]
    report = merge_model_dir(base, adapter, tmp_path / "merged", verify=True)
    assert report["verify"]["max_abs_diff"] < 1e-5
    assert report["merged_modules"] == N_MODULES[model_type]

    merged = safetensors_state(tmp_path / "merged")
    original = safetensors_state(base)
    assert sorted(merged) == sorted(original)
    changed = [k for k in merged if not torch.equal(merged[k], original[k])]
    assert len(changed) == N_MODULES[model_type]

    model = base_model(tmp_path / "merged")
    oracle = PeftModel.from_pretrained(base_model(base), adapter).merge_and_unload().state_dict()
    ours = model.state_dict()
    assert sorted(ours) == sorted(oracle)
    for key, value in ours.items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
    assert not [n for n, _ in model.named_modules() if "lora" in n or "base_layer" in n]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, our_logits, rtol=0, atol=1e-5)


def test_output_keeps_shard_layout_index_and_side_files(tiny, tmp_path):
    base, adapter, _ = tiny["gpt_neox"]
    out = tmp_path / "merged"
    report = merge_model_dir(base, adapter, out)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    index, base_index = (json.loads((d / INDEX_FILE).read_text()) for d in (out, base))
    assert index["weight_map"] == base_index["weight_map"]
    data_bytes = sum(t.numel() * t.element_size() for t in safetensors_state(out).values())
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"] == data_bytes
    side = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert report["copied"] == side
    for name in side:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["adapter_config"]["r"] == 4 and len(record["merged"]) == 2
    assert not (out / "adapter_config.json").exists()  # transformers would take the dir for an adapter
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_single_file_base_gives_single_file_output(tiny, tmp_path):
    base, adapter, our_logits = tiny["llama"]
    single = tmp_path / "single"
    base_model(base).save_pretrained(single)
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    merge_model_dir(single, adapter, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "config.json",
        "generation_config.json",
        RECORD_FILE,
        "model.safetensors",
    ]
    with torch.no_grad():
        torch.testing.assert_close(base_model(tmp_path / "merged")(input_ids=IDS).logits, our_logits, rtol=0, atol=1e-5)


def test_dtype_bf16_merges_in_fp32_and_casts_once(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter, _ = tiny["gpt2"]
    report = merge_model_dir(base, adapter, tmp_path / "merged", dtype="bf16", verify=True)
    merged, original = safetensors_state(tmp_path / "merged"), safetensors_state(base)
    A, B = (
        load_file(adapter / "adapter_model.safetensors")[f"base_model.model.transformer.h.0.attn.c_attn.{p}"]
        for p in ("lora_A.weight", "lora_B.weight")
    )
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(merged[key], (original[key] + (B @ A).T * 2.0).to(torch.bfloat16))
    for k in merged:
        assert merged[k].dtype == torch.bfloat16
        if "c_attn.weight" not in k and "c_proj.weight" not in k:
            assert torch.equal(merged[k], original[k].to(torch.bfloat16)), k
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16
    # Rounding the weights to bf16 moves tiny-model logits by ~1e-3, far less than the adapter does.
    verify = report["verify"]
    assert 1e-5 < verify["max_abs_diff"] < 1e-2 < 0.1 < verify["adapter_effect"]
    assert verify["tolerance"] == pytest.approx(5e-2 * verify["max_abs_logit"])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_merging_in_blocks_of_rows_equals_merging_whole_tensors(tiny, model_type, dtype, tmp_path, monkeypatch):
    """Real bases have tensors of many blocks; here 1 KiB blocks split every tiny tensor the same way."""
    import lora_ds.merge

    base, adapter, _ = tiny[model_type]
    merge_model_dir(base, adapter, tmp_path / "whole", dtype=dtype)
    monkeypatch.setattr(lora_ds.merge, "_BLOCK_BYTES", 1024)
    merge_model_dir(base, adapter, tmp_path / "blocks", dtype=dtype)
    whole, blocks = safetensors_state(tmp_path / "whole"), safetensors_state(tmp_path / "blocks")
    assert sorted(whole) == sorted(blocks)
    merged = set(json.loads((tmp_path / "whole" / RECORD_FILE).read_text())["merged"])
    for key in whole:
        assert whole[key].dtype == blocks[key].dtype and whole[key].shape == blocks[key].shape
        if key in merged:  # BLAS may sum a GEMM of a few rows in another order: 1 fp32 ulp
            torch.testing.assert_close(blocks[key], whole[key], msg=key)
        else:
            assert torch.equal(whole[key], blocks[key]), key


def test_cli_merge_with_verify_reports_fp32_logit_diff(tiny, tmp_path, capsys):
    base, adapter, _ = tiny["gpt_neox"]
    assert (
        main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--verify"]) == 0
    )
    verify = json.loads(capsys.readouterr().out)["verify"]
    assert verify["prompts"] == 4 and verify["max_abs_diff"] < 1e-5 and verify["adapter_effect"] > 0.1


def test_verify_catches_an_adapter_config_that_lies_about_fan_in_fan_out(tiny, tmp_path):
    # GPT-2's attn.c_proj is square, so shapes cannot reveal the wrong layout; the logits do.
    base, _, _ = tiny["gpt2"]
    adapter, _ = make_adapter(base, r"transformer\.h\.\d+\.attn\.c_proj", tmp_path / "adapter", fan_in_fan_out=False)
    merge_model_dir(base, adapter, tmp_path / "unchecked")
    with pytest.raises(UserError, match=r"--verify: merged logits differ .* nothing was written"):
        merge_model_dir(base, adapter, tmp_path / "merged", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "unchecked"]


def shape_mismatched_adapter(tiny, tmp_path):
    base = save_tiny("gpt_neox", VOCAB, tmp_path / "wider", hidden_size=128)
    return make_adapter(base, ["query_key_value"], tmp_path / "wide_adapter")[0]


def nan_adapter(tiny, tmp_path):
    adapter = tmp_path / "nan_adapter"
    shutil.copytree(tiny["gpt_neox"][1], adapter)
    state = load_file(adapter / "adapter_model.safetensors")
    next(v for k, v in state.items() if "lora_B" in k)[0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, adapter / "adapter_model.safetensors")
    return adapter


BAD = {
    "names": (
        lambda tiny, tmp: tiny["llama"][1],
        "gpt_neox",
        r"4 of its 4 modules have no weight in --base .* "
        r"model\.layers\.0\.self_attn\.q_proj\.weight\); the adapter was trained on another base",
    ),
    "shapes": (
        shape_mismatched_adapter,
        "gpt_neox",
        r"query_key_value expects a base weight of shape \[384, 128\], "
        r"but .* is \[192, 64\]; the adapter was trained on another base",
    ),
    "nan": (nan_adapter, "gpt_neox", r"holds NaN/Inf"),
    "fan_in_fan_out": (
        lambda tiny, tmp: make_adapter(tiny["gpt2"][0], ["c_attn"], tmp / "a", fan_in_fan_out=False)[0],
        "gpt2",
        r"shape \[192, 64\], but .* is \[64, 192\] \(it is laid out for fan_in_fan_out=True",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_adapter_of_another_base_is_refused_and_nothing_is_written(tiny, tmp_path, case, capsys):
    make, model_type, message = BAD[case]
    adapter = make(tiny, tmp_path)
    out = tmp_path / "out" / "merged"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        merge_model_dir(tiny[model_type][0], adapter, out)
    assert main(["merge", "--base", str(tiny[model_type][0]), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "lora-ds merge: error: --adapter" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_out_dir_that_is_the_base_is_refused(tiny):
    base, adapter, _ = tiny["llama"]
    with pytest.raises(UserError, match="--out .* would replace --base"):
        merge_model_dir(base, adapter, base)
    assert (base / INDEX_FILE).is_file()


def test_truncated_base_shard_is_refused(tiny, tmp_path):
    base, adapter, _ = tiny["llama"]
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shard = max(broken.glob("*.safetensors"), key=os.path.getsize)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match="lies past the end of the file; the shard is truncated"):
        merge_model_dir(broken, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_weight_is_delta_weight_in_fp32_cast_once(fan_in_fan_out):
    torch.manual_seed(0)
    w0 = torch.randn(96, 80).to(torch.bfloat16)
    A, B = torch.randn(4, 96 if fan_in_fan_out else 80), torch.randn(80 if fan_in_fan_out else 96, 4)
    exact = w0.float() + delta_weight(A, B, 0.5, fan_in_fan_out)
    assert torch.equal(merged_weight(w0, A, B, 0.5, fan_in_fan_out, torch.float32), exact)
    assert torch.equal(merged_weight(w0, A, B, 0.5, fan_in_fan_out), exact.to(torch.bfloat16))
    w32 = w0.float()
    assert torch.equal(merged_weight(w32, A, B, 0.5, fan_in_fan_out), exact)
    assert torch.equal(w32, w0.float())  # the input is never modified
    with pytest.raises(FloatingPointError):
        merged_weight(w0, A, B * float("inf"), 0.5, fan_in_fan_out)
    with pytest.raises(FloatingPointError):  # finite in fp32, beyond fp16's 65504 once cast
        merged_weight(w0.float() + 7e4, A, B, 0.5, fan_in_fan_out, torch.float16)


def test_merged_for_eval_skips_the_lora_path_and_restores_the_base_bitwise(tiny):
    from lora_ds.lora import lora_modules

    base, adapter, our_logits = tiny["gpt2"]
    model = base_model(base)
    inject_lora(model, TARGETS["gpt2"], r=4, alpha=8)
    params = lora_parameters(model)
    with torch.no_grad():
        for key, value in load_file(adapter / "adapter_model.safetensors").items():
            params[key.removeprefix("base_model.model.")].copy_(value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    for _, layer in lora_modules(model):
        layer.lora_A.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad(), merged_for_eval(model):
        assert all(layer.merged for _, layer in lora_modules(model))
        torch.testing.assert_close(model(input_ids=IDS).logits, our_logits, rtol=0, atol=1e-5)
    assert calls == []
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(layer.merged for _, layer in lora_modules(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, our_logits)


def _cut_header(base):
    shard = sorted(base.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return rf"{shard.name}: truncated \(100 bytes, its header alone needs"


def _index_not_json(base):
    (base / INDEX_FILE).write_text("{")
    return rf"{INDEX_FILE}: not valid JSON"


def _index_disagrees(base):
    index = json.loads((base / INDEX_FILE).read_text())
    index["weight_map"]["extra.weight"] = sorted(index["weight_map"].values())[0]
    (base / INDEX_FILE).write_text(json.dumps(index))
    return rf"{INDEX_FILE}: weight_map and the shards disagree \(e.g. \['extra.weight'\]\)"


def _shard_lost(base):
    shard = sorted(base.glob("*.safetensors"))[-1]
    shard.unlink()
    return rf"shard {shard.name} \(listed in {INDEX_FILE}\) is missing"


DAMAGED_BASES = {
    "header cut": _cut_header,
    "index not json": _index_not_json,
    "index disagrees": _index_disagrees,
    "shard lost": _shard_lost,
}


@pytest.mark.parametrize("case", sorted(DAMAGED_BASES))
def test_a_damaged_base_dir_gets_one_message_from_merge_analyze_and_the_model_check(tiny, tmp_path, case):
    from lora_ds.analyze import analyze
    from lora_ds.model import check_model_dir

    base, adapter, _ = tiny["gpt_neox"]
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    message = DAMAGED_BASES[case](broken)
    for check in (
        lambda: merge_model_dir(broken, adapter, tmp_path / "merged"),
        lambda: analyze([str(adapter)], str(tmp_path / "analysis"), base_dir=str(broken), progress=False),
        lambda: check_model_dir(str(broken)),
    ):
        with pytest.raises(UserError, match=message):
            check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
