"""--modules_to_save and --add_tokens in one process: PEFT as the oracle of the adapter's keys, config and logits
(untied and tied embeddings), the deferred loss's head gradient, the grown vocabulary, and the refusals. The 2-rank
ZeRO-3 run is tests/test_train_distributed.py's test_add_tokens_*."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fixtures import tiny_model as tiny
from helpers import DEMO_TOKENIZER, adapter_tensors

from lora_ds.adapter import peft_config, read_adapter, with_tied, write_adapter
from lora_ds.config import FieldError, parse_config
from lora_ds.errors import UserError
from lora_ds.lora import inject_lora, lora_parameters
from lora_ds.loss import defer_lm_head, lm_loss
from lora_ds.saved_modules import embedding_entries, select, tied_names, unfreeze
from lora_ds.vocab import extend_tokenizer, grow_vocab, read_tokens

R, ALPHA = 4, 8
# family -> (LoRA targets, modules_to_save, tied embeddings)
CASES = {
    "gpt_neox": (["query_key_value"], ["lm_head", "embed_in"], False),
    "llama3": (["q_proj", "v_proj"], ["embed_tokens"], True),  # tiny-llama3 ties its head to its embedding
}


def trained(family: str):
    """(base, ours: LoRA + modules trained in full with non-trivial values, their tensors as the trainer saves them,
    the adapter config)."""
    targets, modules_to_save, _ = CASES[family]
    base = tiny(family).eval()
    ours = copy.deepcopy(base)
    adapted = inject_lora(ours, targets, R, ALPHA, seed=1)
    params = lora_parameters(ours)
    saved = unfreeze(ours, select(ours, modules_to_save, adapted))
    params.update(saved)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in params.items():
            if not name.endswith("lora_A.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    tied = tied_names(ours, saved)
    config = peft_config(
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=targets,
        use_rslora=False,
        fan_in_fan_out=False,
        base_model="base",
        modules_to_save=modules_to_save,
        ensure_weight_tying=bool(tied),
    )
    tensors = with_tied({n: p.detach().clone() for n, p in params.items()}, tied)
    return base, ours.eval(), tensors, config


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", sorted(CASES))
def test_saved_adapter_has_peft_s_keys_and_config_and_peft_loads_it_to_our_logits(family, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    targets, modules_to_save, is_tied = CASES[family]
    base, ours, tensors, config = trained(family)
    write_adapter(tmp_path / "ours", tensors, config)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            target_modules=targets,
            modules_to_save=list(modules_to_save),  # PEFT adds a tied module to the list it is given
            ensure_weight_tying=is_tied,
        ),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    theirs, mine = adapter_tensors(tmp_path / "peft"), adapter_tensors(tmp_path / "ours")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert sum("lora" not in k for k in mine) == 2  # untied: head and embedding; tied: the one matrix, both names
    if is_tied:
        assert torch.equal(mine["lm_head.weight"], mine["model.embed_tokens.weight"])
    peft_config_file = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours_config.get("ensure_weight_tying", False) == peft_config_file["ensure_weight_tying"] == is_tied
    if not is_tied:  # PEFT records the tied head's module under the embedding's full name too
        assert sorted(ours_config["modules_to_save"]) == sorted(peft_config_file["modules_to_save"])
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = ours(input_ids=ids()).logits
        torch.testing.assert_close(loaded(input_ids=ids()).logits, expected, rtol=0, atol=1e-5)
        assert (expected - base(input_ids=ids()).logits).abs().max() > 1e-2
    read_config, read_tensors = read_adapter(str(tmp_path / "ours"))
    assert sorted(read_tensors) == sorted(tensors) and read_config["modules_to_save"] == modules_to_save


def test_deferred_loss_gives_the_trained_head_and_embedding_the_gradients_of_full_logits():
    from lora_ds.data import collate

    full = tiny("gpt_neox")
    for p in full.parameters():
        p.requires_grad_(False)
    unfreeze(full, ["lm_head", "gpt_neox.embed_in"])
    deferred = copy.deepcopy(full)
    assert defer_lm_head(deferred) is not None
    gen = torch.Generator().manual_seed(4)
    rows = [{"input_ids": torch.randint(0, 512, (n,), generator=gen).tolist()} for n in (9, 14)]
    for row in rows:
        row["labels"] = [-100] * 3 + row["input_ids"][3:]
        row["position_ids"] = list(range(len(row["input_ids"])))
    batch = collate(rows, 0)
    for model in (full, deferred):
        loss, _ = lm_loss(model, batch)
        loss.backward()
    grads = {n: p.grad for n, p in full.named_parameters() if p.requires_grad}
    assert len(grads) == 2
    for name, p in deferred.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_add_tokens_extends_the_tokenizer_and_grows_both_matrices_with_rows_at_the_old_mean(tmp_path):
    (tmp_path / "tokens.txt").write_text("SELECT\nWHERE\n")
    tok, files, first = extend_tokenizer(str(DEMO_TOKENIZER), str(tmp_path / "tokens.txt"))
    assert (first, tok.vocab_size) == (512, 514) and "tokenizer.json" in files
    assert tok.encode("SELECT x WHERE")[0] == 512 and 513 in tok.encode("SELECT x WHERE")
    model = tiny("gpt_neox", vocab_size=512)
    embed, head = model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight
    head = head.detach().clone()
    assert grow_vocab(model, tok.vocab_size, first) == 514 and model.config.vocab_size == 514
    for old, new in ((embed, model.get_input_embeddings().weight), (head, model.get_output_embeddings().weight)):
        assert new.shape == (514, 64) and torch.equal(new[:512], old)
        assert torch.equal(new[512], old.mean(dim=0)) and torch.equal(new[513], old.mean(dim=0))
    assert embedding_entries(model) == ["embed_in", "lm_head"]
    chat, _, _ = extend_tokenizer(str(DEMO_TOKENIZER), "template:chatml")
    assert {"<|im_start|>", "<|im_end|>"} <= set(chat.special_tokens) and chat.vocab_size == 514


def test_bad_modules_to_save_and_add_tokens_are_refused_naming_the_flag_or_file(tmp_path):
    model = tiny("gpt_neox")
    adapted = inject_lora(model, ["query_key_value"], R, ALPHA)
    with pytest.raises(FieldError, match=r"lora.modules_to_save nothing: selects no module"):
        select(model, ["nothing"], adapted)
    with pytest.raises(FieldError, match=r"is also adapted by --lora_targets"):
        select(model, ["attention"], adapted)
    assert parse_config(["--modules_to_save", "lm_head, embed_in"]).lora.modules_to_save == ["lm_head", "embed_in"]
    (tmp_path / "twice.txt").write_text("a\nb\na\n")
    (tmp_path / "empty.txt").write_text("\n")
    for spec, message in (("twice.txt", "listed twice"), ("empty.txt", "holds no tokens"), ("none.txt", "no such")):
        with pytest.raises(UserError, match=message):
            read_tokens(str(tmp_path / spec))
    with pytest.raises(UserError, match="choose template:chatml"):
        read_tokens("template:alpaca")
    _, _, tensors, config = trained("gpt_neox")
    with pytest.raises(UserError, match="no param of a module that adapter_config.json's modules_to_save"):
        write_adapter(tmp_path / "a", tensors, config | {"modules_to_save": ["lm_head"]})
    lacking = {k: v for k, v in tensors.items() if "embed_in" not in k}
    with pytest.raises(UserError, match="lists 'embed_in' in modules_to_save, but no tensor"):
        write_adapter(tmp_path / "b", lacking, config)
