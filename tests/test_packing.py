"""Packing: first-fit rows that keep examples whole, and a block-causal mask under which every packed
example gets the loss it gets alone (tiny random GPT-NeoX and Llama, sdpa and eager with the dense mask; FlexAttention
with the mask transformers builds from the position ids, forward only: it has no backward on CPU)."""

from __future__ import annotations

import pytest
import torch
from fixtures import tiny_model as preset_shaped

from lora_ds.data import collate
from lora_ds.packing import block_causal_mask, pack_rows

IGNORE = -100


def example(i: int, n_context: int, n_target: int, vocab: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed * 1000 + i)
    ids = torch.randint(3, vocab, (n_context + n_target,), generator=gen).tolist()
    return {
        "id": f"ex{i}",
        "input_ids": ids,
        "labels": [IGNORE] * n_context + ids[n_context:],
        "position_ids": list(range(len(ids))),
    }


def test_first_fit_keeps_examples_whole_and_in_order():
    rows = [example(i, n - 2, 2) for i, n in enumerate([6, 5, 4, 3, 8, 2, 7])]
    packed = pack_rows(rows, pack_len=10)
    # each example goes to the first row with room: 4 joins 6, 3 and then 2 join 5, 8 and 7 open rows
    assert [r["id"] for r in packed] == ["ex0,ex2", "ex1,ex3,ex5", "ex4", "ex6"]
    assert [r["length"] for r in packed] == [10, 10, 8, 7]
    second = packed[1]
    assert second["input_ids"] == rows[1]["input_ids"] + rows[3]["input_ids"] + rows[5]["input_ids"]
    assert second["labels"] == rows[1]["labels"] + rows[3]["labels"] + rows[5]["labels"]
    assert second["position_ids"] == list(range(5)) + list(range(3)) + list(range(2))
    assert pack_rows(rows, pack_len=10) == packed
    assert pack_rows([], pack_len=10) == []
    with pytest.raises(ValueError, match="ex4 has 8 tokens, more than the pack length 7"):
        pack_rows(rows, pack_len=7)


def test_mask_is_causal_within_examples_and_ignores_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 0, 0]])
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    allowed = block_causal_mask(pos, real, torch.bool)
    assert allowed.shape == (2, 1, 6, 6)
    expected_row0 = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed[0, 0], expected_row0)
    assert torch.equal(allowed[1, 0, 4:], torch.eye(6, dtype=torch.bool)[4:])  # padding sees only itself
    additive = block_causal_mask(pos, real, torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, allowed) and additive.min() == torch.finfo(torch.float32).min


def tiny_model(model_type: str, attn: str):
    """Smaller than the tiny presets: 32 wide, 64 tokens; GPT-NeoX's rotary on every dimension."""
    extra = {"gpt_neox": dict(rotary_pct=1.0), "llama": dict(num_key_value_heads=2)}[model_type]
    return preset_shaped(
        model_type,
        attn,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
        **extra,
    ).eval()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each token's label given the tokens before it (0 where ignored), as HF shifts it."""
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )
    return torch.nn.functional.pad(losses, (1, 0))


# flex_attention: no mask passed; transformers builds a block mask from the position ids (the GPU path of packed
# data, lora_ds.data.collate(mask_from_positions=True)). Forward only: FlexAttention has no backward on CPU.
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("model_type", ["gpt_neox", "llama"])
def test_packed_example_loss_equals_its_loss_alone(model_type, attn):
    model = tiny_model(model_type, attn)
    sizes = [(5, 3), (2, 6), (9, 4), (3, 2), (4, 4), (6, 1), (1, 5)]
    rows = [example(i, c, t, seed=1) for i, (c, t) in enumerate(sizes)]
    packed = pack_rows(rows, pack_len=16)
    assert len(packed) >= 3 and len({r["length"] for r in packed}) > 1  # several rows, so some are padded

    width = max(r["length"] for r in packed)
    ids = torch.zeros(len(packed), width, dtype=torch.long)
    labels = torch.full((len(packed), width), IGNORE)
    pos = torch.zeros(len(packed), width, dtype=torch.long)
    real = torch.zeros(len(packed), width, dtype=torch.long)
    for b, r in enumerate(packed):
        n = r["length"]
        ids[b, :n], labels[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
        pos[b, :n], real[b, :n] = torch.tensor(r["position_ids"]), 1
    mask = block_causal_mask(pos, real, torch.float32)
    if attn == "flex_attention":  # the trainer's batch for FlexAttention: no mask, whole 128-token blocks
        batch = collate(packed, pad_id=0, mask_from_positions=True)
        assert "attention_mask" not in batch and batch["input_ids"].shape == (len(packed), 128)
        ids, labels, pos, mask = batch["input_ids"], batch["labels"], batch["position_ids"], None
    alone_model = model
    if attn == "flex_attention":  # alone: the same weights through SDPA (a lone row takes no packing path)
        alone_model = tiny_model(model_type, "sdpa")
        alone_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        # use_cache=False, as the trainer builds its models: with a cache transformers does not look for packing.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    losses = token_losses(logits, labels)

    by_id = {r["id"]: r for r in rows}
    checked = 0
    for b, r in enumerate(packed):
        start = 0
        for ex_id in r["id"].split(","):
            alone = by_id[ex_id]
            n = len(alone["input_ids"])
            with torch.no_grad():
                alone_logits = alone_model(input_ids=torch.tensor([alone["input_ids"]])).logits
            alone_losses = token_losses(alone_logits, torch.tensor([alone["labels"]]))[0]
            torch.testing.assert_close(losses[b, start : start + n], alone_losses, rtol=1e-5, atol=1e-5)
            start, checked = start + n, checked + 1
    assert checked == len(rows)
