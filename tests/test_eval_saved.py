"""Evaluating an adapter with modules trained in full (modules_to_save) and a vocabulary grown by --add_tokens, in
one process: the eval model of base + adapter equals the `lora-ds merge` output and PEFT on the resized base (untied
and tied embeddings), `lora-ds eval` / `lora-ds generate --adapter` give what they give on the merged dir, with the
adapter's tokenizer, and adapters that do not fit the base are refused naming the file and key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from fixtures import save_tiny
from helpers import DEMO_TOKENIZER, tiny_adapter_config

from lora_ds.adapter import with_tied, write_adapter
from lora_ds.cli import main as cli
from lora_ds.errors import UserError
from lora_ds.eval_model import build_eval_model, lora_tokenizer_dir, merge_lora, read_lora
from lora_ds.lora import inject_lora, lora_parameters
from lora_ds.saved_modules import select, tied_names, unfreeze
from lora_ds.tokenizer import load_tokenizer
from lora_ds.vocab import extend_tokenizer, grow_vocab

ADDED = 2  # SELECT and WHERE: words of the WikiSQL queries
# family -> (LoRA targets, modules_to_save); tiny-llama3 ties its head to its embedding (ensure_weight_tying)
CASES = {"gpt_neox": (["query_key_value"], ["lm_head", "embed_in"]), "llama3": (["q_proj", "v_proj"], ["embed_tokens"])}


def write_saved_adapter(base: Path, out: Path, family: str) -> Path:
    """A PEFT adapter of `base` as an --add_tokens run writes it: its tokenizer with 2 tokens more, LoRA on the
    family's targets and the grown embeddings (and head) trained in full, all moved off their initial values."""
    from transformers import AutoModelForCausalLM

    targets, modules_to_save = CASES[family]
    (out.parent / "tokens.txt").write_text("SELECT\nWHERE\n")
    tok, files, first = extend_tokenizer(str(base), str(out.parent / "tokens.txt"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    grow_vocab(model, tok.vocab_size, first)
    adapted = inject_lora(model, targets, 4, 8, seed=1)
    params = lora_parameters(model)
    saved = unfreeze(model, select(model, modules_to_save, adapted))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in (params | saved).items():
            if not name.endswith("lora_A.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    tied = tied_names(model, saved)
    config = tiny_adapter_config(targets, base, modules_to_save=modules_to_save, ensure_weight_tying=bool(tied))
    tensors = with_tied({n: p.detach().clone() for n, p in (params | saved).items()}, tied)
    write_adapter(str(out), tensors, config, extra_json=files)
    return out


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return save_tiny("llama3", 512, tmp_path_factory.mktemp("llama3"), tokenizer=DEMO_TOKENIZER)


@pytest.fixture(scope="module")
def neox_saved(base_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the saved-modules adapter of base_dir, base_dir + it merged by `lora-ds merge`)."""
    root = tmp_path_factory.mktemp("neox_saved")
    adapter = write_saved_adapter(base_dir, root / "adapter", "gpt_neox")
    assert cli(["merge", "--base", str(base_dir), "--adapter", str(adapter), "--out", str(root / "merged")]) == 0
    return adapter, root / "merged"


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(CASES))
def test_eval_model_of_base_and_saved_modules_equals_the_merged_dir_and_peft_on_the_resized_base(
    family, base_dir, llama3_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base_dir if family == "gpt_neox" else llama3_dir
    adapter = write_saved_adapter(base, tmp_path / "adapter", family)
    lora = read_lora(str(adapter), None)
    assert lora_tokenizer_dir(lora) == str(adapter) and lora_tokenizer_dir(read_lora(None, None)) is None
    tok = load_tokenizer(lora_tokenizer_dir(lora))
    assert tok.vocab_size == 512 + ADDED
    model, _, _ = build_eval_model(str(base), tok, lora, "fp32", None)
    assert model.get_input_embeddings().weight.shape == (512 + ADDED, 64)
    assert not [n for n, _ in model.named_modules() if "lora_" in n or n.endswith("base_layer")]
    if family == "llama3":  # the tied matrix written once: still one matrix
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert cli(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    resized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    original = copy.deepcopy(resized).eval()
    resized.resize_token_embeddings(512 + ADDED)
    peft_model = PeftModel.from_pretrained(resized, adapter).eval()
    ids = torch.randint(0, 512 + ADDED, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = logits(model, ids)
    torch.testing.assert_close(ours, logits(merged, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, logits(peft_model, ids), rtol=0, atol=1e-5)
    assert (ours[..., :512] - logits(original, ids.clamp(max=511))).abs().max() > 1e-2


def test_eval_and_generate_with_the_adapter_give_what_the_merged_dir_gives(
    neox_saved, base_dir, wikisql_file, tmp_path, capsys
):
    adapter, merged = neox_saved
    common = ["--task", "wikisql", "--data", str(wikisql_file), "--dtype", "fp32", "--max-new-tokens", "16"]
    assert (
        cli(["eval", "--model", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "a"), *common]) == 0
    )
    assert cli(["eval", "--model", str(merged), "--out", str(tmp_path / "m"), *common]) == 0
    rows = [[json.loads(line) for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in "am"]
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]] and len(rows[0]) == 5
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in "am"]
    assert metrics[0]["metrics"] == metrics[1]["metrics"] and metrics[0]["lora"] == str(adapter)
    capsys.readouterr()
    prompt = ["--prompt", "SELECT name WHERE", "--no_template", "--dtype", "fp32", "--max_new_tokens", "12"]
    outputs = []
    for source in (["--model", str(base_dir), "--adapter", str(adapter)], ["--model", str(merged)]):
        assert cli(["generate", *source, *prompt]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_saved_modules_that_do_not_fit_the_base_are_refused_naming_the_adapter_and_key(neox_saved, base_dir):
    from transformers import AutoModelForCausalLM

    adapter, _ = neox_saved
    rows = 512 + ADDED
    cases = {  # what replaces the adapter's lm_head.weight -> the refusal
        "another hidden size": (
            {"lm_head.weight": torch.zeros(rows, 32)},
            rf"lm_head.weight \(modules_to_save\) is \[{rows}, 32\], but it is \[{rows}, 64\] in this model",
        ),
        "a module the base has not": (
            {"gpt_neox.embed_out.weight": torch.zeros(rows, 64)},
            r"gpt_neox.embed_out.weight \(modules_to_save\) is .* not in this model",
        ),
        "another vocabulary": (
            {"lm_head.weight": torch.zeros(rows + 1, 64)},
            rf"disagree on the vocabulary \(\[{rows}, {rows + 1}\]\)",
        ),
        "no head": ({}, r"its vocabulary grew, but it holds no lm_head.weight"),
    }
    for replacement, message in cases.values():
        lora = read_lora(str(adapter), None)
        lora.tensors = {k: v for k, v in lora.tensors.items() if k != "lm_head.weight"} | replacement
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with pytest.raises(UserError, match=rf"^{adapter}: .*{message}"):
            merge_lora(model, lora)
