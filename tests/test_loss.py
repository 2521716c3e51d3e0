"""The chunked LM-head loss equals the plain full-logits loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
from fixtures import tiny_model as tiny

from lora_ds import loss as loss_mod
from lora_ds.data import IGNORE_INDEX
from lora_ds.lora import inject_lora, lora_parameters
from lora_ds.loss import defer_lm_head, lm_loss


@pytest.mark.parametrize("model_type,targets", [("gpt_neox", ["query_key_value"]), ("gpt2", ["c_attn"])])
def test_deferred_chunked_loss_matches_full_logits(model_type, targets, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 7)  # several chunks, the last one partial
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    batch = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(12).expand(3, 12),
    }
    results = []
    for defer in (False, True):
        model = tiny(model_type)
        inject_lora(model, targets, 4, 8, seed=1)
        for name, p in lora_parameters(model).items():
            if name.endswith("lora_B.weight"):
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        if defer:
            defer_lm_head(model)
        loss, n = lm_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in lora_parameters(model).items()}))
    (plain, n0, g0), (chunked, n1, g1) = results
    assert n0 == n1 == 3 * 7
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_deferred_head_still_gives_logits_outside_the_loss():
    model = tiny("gpt_neox")
    ids = torch.randint(0, 512, (1, 6))
    before = model(input_ids=ids).logits
    defer_lm_head(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
