"""Every model family lora_ds knows (lora_ds/families.py), on its tiny preset and through the trainer's build
(lora_ds.build.build_trainable): default targets and all-linear as PEFT selects them, adapters that PEFT loads
with our logits, a training loss (and LoRA gradients) equal to the model's own `labels=` loss, and the attention
fallback."""

from __future__ import annotations

import pytest
import torch
from fixtures import save_tiny
from fixtures import tiny_model as tiny
from helpers import flags

from lora_ds.build import build_trainable
from lora_ds.config import parse_config
from lora_ds.data import IGNORE_INDEX, collate
from lora_ds.errors import UserError
from lora_ds.families import FAMILIES
from lora_ds.lora import lora_parameters
from lora_ds.loss import DeferredLMHead, lm_loss
from lora_ds.model import PRESETS

# The tiny preset of each family (tiny-<name>); Llama has two, Llama 3's with rope scaling and tied embeddings.
TINY = [
    "gpt_neox",
    "gpt2",
    "llama",
    "llama3",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "cohere",
    "granite",
]
# What makes each family's logit math act on the small logits of random weights (the published soft-cap of 30
# would change them by a few 1e-6); Cohere's published logit_scale (0.0625) and the preset's logits_scaling
# (8) act already.
BITE = {"gemma2": dict(final_logit_softcapping=0.5), "gemma3": dict(final_logit_softcapping=0.5)}
VOCAB = 512


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tiny_dir(name): the model dir of the tiny preset `name` (BITE's changes made), written once per module."""
    dirs = {}

    def get(name: str):
        if name not in dirs:
            dirs[name] = save_tiny(name, VOCAB, tmp_path_factory.mktemp(name), **BITE.get(name, {}))
        return dirs[name]

    return get


def test_every_family_has_a_tiny_preset():
    assert sorted({PRESETS[f"tiny-{name.replace('_', '-')}"][0] for name in TINY}) == sorted(FAMILIES)


def trainable(model_dir, **values):
    """build_trainable of `model_dir` as the trainer builds it (fp32, r 4, one process), `values` as more flags."""
    cfg = parse_config(flags(model=model_dir, dtype="fp32", lora_r=4, lora_alpha=8, seed=3, **values))
    return build_trainable(cfg, None)


def batch(seed: int = 0) -> dict:
    """Three right-padded rows of the trainer's collate, their first tokens (the prompt) masked out of the loss."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, prompt in ((24, 9), (17, 5), (30, 12)):
        ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        rows.append(
            {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "position_ids": list(range(n))}
        )
    return collate(rows, pad_id=0)


def peft_modules(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default targets", "all-linear"])
@pytest.mark.parametrize("name", TINY)
def test_the_adapter_selects_what_peft_selects_and_gives_pefts_logits(name, targets, tiny_dir, tmp_path):
    """Our adapted modules are PEFT's (its defaults where it has them, its all-linear: every Linear/Conv1D but the
    output head); the adapter written as the trainer writes it loads in PEFT onto the base with our logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import peft_config, read_adapter, write_adapter

    base = tiny_dir(name)
    ours = trainable(base, lora_targets=targets)
    model_type = ours.model.config.model_type
    fan_in_fan_out = any(getattr(m, "fan_in_fan_out", False) for m in ours.model.modules())  # GPT-2's Conv1D
    oracle = LoraConfig(
        r=4, target_modules=targets or PEFT_DEFAULTS.get(model_type, ours.targets), fan_in_fan_out=fan_in_fan_out
    )
    assert sorted(ours.adapted) == peft_modules(get_peft_model(AutoModelForCausalLM.from_pretrained(base), oracle))
    assert "lm_head" not in ours.targets and all(isinstance(t, str) for t in ours.targets)

    with torch.no_grad():
        for param_name, p in ours.lora.items():
            if param_name.endswith("lora_B.weight"):
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(param_name)))
    config = peft_config(
        r=4, alpha=8, dropout=0.0, target_modules=ours.targets, use_rslora=False, fan_in_fan_out=fan_in_fan_out,
        base_model=str(base),
    )  # fmt: skip
    write_adapter(str(tmp_path / "adapter"), dict(ours.lora), config)
    assert read_adapter(str(tmp_path / "adapter"))[0] == config

    ids = batch()["input_ids"]
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    assert peft_modules(peft_model) == sorted(ours.adapted)
    with torch.no_grad():
        expected = ours.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=ids).logits - expected).abs().max() > 1e-4
    if targets == "all-linear":  # the other readers of target_modules: the merge, and eval's merge into a live base
        from lora_ds.eval_model import merge_lora, read_lora
        from lora_ds.merge import merge_model_dir

        report = merge_model_dir(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"), verify=True)
        assert report["merged_modules"] == len(ours.adapted)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        live = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        assert sorted(merge_lora(live, read_lora(str(tmp_path / "adapter"), None))) == sorted(ours.adapted)
        with torch.no_grad():
            for model in (merged, live):
                torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_step0_training_loss_and_lora_gradients_are_the_models_own(name, tiny_dir):
    """The trainer's loss at step 0 (LoRA B = 0; the fused chunked head with the family's logit math) equals the
    model's own `labels=` loss, and its LoRA gradients equal autograd's through the model's own loss."""
    from transformers import AutoModelForCausalLM

    from lora_ds import loss as loss_module
    from lora_ds.lora import inject_lora

    base = tiny_dir(name)
    data = batch()
    ours = trainable(base)
    assert isinstance(ours.model.get_output_embeddings(), DeferredLMHead)  # the fused path, not the fallback
    old_chunk, loss_module.CHUNK_TOKENS = loss_module.CHUNK_TOKENS, 7  # several chunks, the last one partial
    try:
        loss, n_targets = lm_loss(ours.model, data)
    finally:
        loss_module.CHUNK_TOKENS = old_chunk
    loss.backward()

    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=ours.attention)
    inject_lora(reference, ours.targets, 4, 8, seed=3)
    inputs = {k: data[k] for k in ("input_ids", "attention_mask", "position_ids")}
    own = reference(**inputs, labels=data["labels"]).loss
    own.backward()
    assert n_targets == 15 + 12 + 18
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-6)
    expected = lora_parameters(reference)
    for param_name, p in lora_parameters(ours.model).items():
        torch.testing.assert_close(p.grad, expected[param_name].grad, rtol=1e-5, atol=1e-7, msg=param_name)
    assert max(p.grad.abs().max().item() for p in expected.values()) > 1e-4

    head = reference.get_output_embeddings().weight
    with torch.no_grad():  # the family's logit math matters: cross-entropy of the raw h·Wᵀ is another number
        hidden = reference(**inputs, output_hidden_states=True).hidden_states[-1]
        raw = torch.nn.functional.cross_entropy(
            (hidden[:, :-1] @ head.T).flatten(0, 1), data["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
    plain = name not in (*BITE, "cohere", "granite")
    assert (abs(raw.item() - own.item()) < 1e-5) == plain, (raw.item(), own.item())


def test_a_model_type_lora_ds_does_not_know_trains_on_its_own_loss(tmp_path):
    """No fused head for an unknown logit math: the loss is the model's `labels=` loss, over full logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ds.model import TINY_SHAPE

    torch.manual_seed(0)
    config = AutoConfig.for_model("olmo2", **TINY_SHAPE)
    assert config.model_type not in FAMILIES
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "base")
    ours = trainable(tmp_path / "base", lora_targets="q_proj,v_proj")
    assert not isinstance(ours.model.get_output_embeddings(), DeferredLMHead)
    data = batch()
    loss, _ = lm_loss(ours.model, data)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    own = reference(**{k: data[k] for k in ("input_ids", "attention_mask", "position_ids")}, labels=data["labels"])
    torch.testing.assert_close(loss, own.loss, rtol=0, atol=0)


@pytest.mark.parametrize("requested,expected", [("auto", "eager"), ("eager", "eager")])
def test_an_architecture_without_sdpa_falls_back_and_says_so_once(requested, expected, capsys):
    """Gemma 2 has no SDPA (its attention logits are soft-capped): auto picks eager on CPU, said once."""
    from lora_ds import model as model_module

    model_module._SAID.clear()
    for _ in range(2):
        assert tiny("gemma2", requested).config._attn_implementation == expected
    said = capsys.readouterr().out.splitlines()
    assert said == (
        ["--attn_implementation auto: gemma2 models have no sdpa attention; using eager"] if requested == "auto" else []
    )


def test_an_attention_the_architecture_lacks_is_refused_naming_the_flag():
    with pytest.raises(UserError, match=r"--attn_implementation sdpa: gemma2 models do not support it; choose eager, "):
        tiny("gemma2", "sdpa")
    assert tiny("gemma3", "sdpa").config._attn_implementation == "sdpa"


def test_all_linear_stands_alone_in_the_flag():
    with pytest.raises(UserError, match="--lora_targets .*all-linear stands alone"):
        parse_config(["--lora_targets", "all-linear,q_proj"])
    assert parse_config(["--lora_targets", "ALL-LINEAR"]).lora.target_spec() == ["ALL-LINEAR"]


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_a_packed_example_longer_than_the_sliding_window_gets_its_logits_alone(name, tiny_dir):
    """Packed rows of a model with sliding-window layers go without the one dense mask, which would let those layers
    look past their window: transformers builds each layer's mask from the position ids."""
    ours = trainable(tiny_dir(name))
    window = ours.model.config.sliding_window
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (window + 20, 20))
    row = {"input_ids": first + second, "labels": first + second, "position_ids": [*range(window + 20), *range(20)]}
    packed = collate([row], pad_id=0, mask_from_positions=ours.mask_from_positions)
    assert ours.mask_from_positions and "attention_mask" not in packed
    model = ours.model.eval()
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        for start, example in ((0, first), (len(first), second)):
            alone = model(input_ids=torch.tensor([example])).logits[0]
            torch.testing.assert_close(logits[start : start + len(example)], alone, rtol=1e-5, atol=1e-5)
