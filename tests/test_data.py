"""Example encoding, the step sampler, eval sharding, batching, and the tokenizer loaders."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DEMO_TOKENIZER

from lora_ds.data import IGNORE_INDEX, StepSampler, collate, encode_pair, eval_shards, load_rows
from lora_ds.errors import UserError
from lora_ds.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def hf_tok():
    return load_tokenizer(str(DEMO_TOKENIZER))


def test_loss_covers_the_completion_and_eos_only(hf_tok):
    row, truncated = encode_pair(hf_tok, "Question: who?\nSQL:", " SELECT mayor")
    target = hf_tok.encode(" SELECT mayor") + [hf_tok.eos_token_id]
    n_ctx = len(row["input_ids"]) - len(target)
    assert not truncated and n_ctx == len(hf_tok.encode("Question: who?\nSQL:"))
    assert row["labels"] == [IGNORE_INDEX] * n_ctx + target
    assert row["input_ids"][n_ctx:] == target and row["position_ids"] == list(range(len(row["input_ids"])))


def test_overlong_examples_lose_context_from_the_left_never_target(hf_tok):
    prompt = "Table: city (text) | mayor (text)\nQuestion: Who is the mayor of Aldport?\nSQL:"
    full, _ = encode_pair(hf_tok, prompt, " SELECT mayor")
    row, truncated = encode_pair(hf_tok, prompt, " SELECT mayor", max_len=len(full["input_ids"]) - 5)
    assert truncated and row["input_ids"] == full["input_ids"][5:] and row["labels"] == full["labels"][5:]
    assert encode_pair(hf_tok, prompt, " SELECT mayor", max_len=3) == (None, False)
    assert encode_pair(hf_tok, prompt, " SELECT mayor", max_len=len(full["input_ids"]) - 1, truncate=False) == (
        None,
        False,
    )


def test_sentencepiece_dir_gives_sentencepiece_ids_with_bos(llama_dir):
    import sentencepiece as spm

    tok = load_tokenizer(str(llama_dir))
    sp = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    text = "Question: Who is the mayor of Farrow?"
    assert tok.encode(text) == sp.encode(text) and tok.add_bos and tok.bos_token_id == 1
    assert tok.eos_token_id == 2 and tok.decode(tok.encode(text)) == text
    row, _ = encode_pair(tok, "Q:", " A")
    assert row["input_ids"][0] == 1 and row["input_ids"][-1] == 2
    assert load_tokenizer(str(llama_dir / "tokenizer.model")).identity == tok.identity


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer found"):
        load_tokenizer(str(tmp_path))


def test_sampler_gives_each_rank_a_disjoint_share_of_every_step():
    world, micro, accum = 3, 2, 2
    sampler = StepSampler(50, micro, accum, world, seed=5)
    assert sampler.steps_per_epoch == 4
    seen = []
    for step in range(8):
        shares = [sampler.micro_batches(step, rank) for rank in range(world)]
        flat = [i for share in shares for batch in share for i in batch]
        assert len(flat) == len(set(flat)) == micro * accum * world
        seen.append(flat)
    epoch0 = {i for s in seen[:4] for i in s}
    assert len(epoch0) == 48 and seen[:4] != seen[4:]
    again = StepSampler(50, micro, accum, world, seed=5)
    assert again.micro_batches(6, 1) == sampler.micro_batches(6, 1)
    assert StepSampler(50, micro, accum, world, seed=6).micro_batches(0, 0) != sampler.micro_batches(0, 0)


def test_sampler_rejects_data_smaller_than_one_step():
    with pytest.raises(UserError, match="one step needs 16"):
        StepSampler(10, 4, 2, 2, seed=0)


def test_eval_shards_keep_ranks_in_lockstep():
    shards = [eval_shards(7, 2, 3, rank) for rank in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    real = sorted(i for s in shards for b in s for i in b if i >= 0)
    assert real == list(range(7)) and sum(i < 0 for s in shards for b in s for i in b) == 2


def test_collate_pads_right_masks_padding_and_leaves_unpadded_rows_unmasked(hf_tok):
    a, _ = encode_pair(hf_tok, "Q: a", " x")
    b, _ = encode_pair(hf_tok, "Question: a longer one", " SELECT y")
    batch = collate([a, b], pad_id=hf_tok.pad_token_id)
    n = len(a["input_ids"])
    width = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, width) and batch["attention_mask"][0].sum() == n
    assert torch.all(batch["labels"][0, n:] == IGNORE_INDEX)
    assert torch.all(batch["input_ids"][0, n:] == hf_tok.pad_token_id)
    # Rows of one length need no mask: the model's causal one alone, with no padding check on the device.
    unpadded = collate([b, b], pad_id=hf_tok.pad_token_id)
    assert "attention_mask" not in unpadded and unpadded["input_ids"].shape == (2, width)


def test_jsonl_errors_name_file_line_and_field(tmp_path, hf_tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'completion'"):
        load_rows(str(bad), hf_tok, 64)
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: not valid JSON"):
        load_rows(str(bad), hf_tok, 64)
    bad.write_text("")
    with pytest.raises(UserError, match="the data file is empty"):
        load_rows(str(bad), hf_tok, 64)
    with pytest.raises(UserError, match="no manifest.json"):
        load_rows(str(tmp_path), hf_tok, 64)
