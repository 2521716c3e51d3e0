"""Models: named presets (random weights, for tests and benchmarks) and local Hugging Face model dirs.

Under ZeRO-3 the base is built or loaded inside `deepspeed.zero.Init` (through transformers'
`HfDeepSpeedConfig`), so no rank ever holds the whole base: a model dir is read shard by shard
straight into the partitions.
"""

from __future__ import annotations

import os

import torch

from lora_ds.dtypes import DTYPES
from lora_ds.errors import UserError
from lora_ds.hf_dir import read_model_dir

# (model_type, config kwargs). Big shapes follow the published configs.
PRESETS = {
    "tiny-gpt-neox": (
        "gpt_neox",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=1024,
            vocab_size=512,
            rotary_pct=0.25,
        ),
    ),
    "tiny-llama": (
        "llama",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=176,
            max_position_embeddings=1024,
            vocab_size=512,
        ),
    ),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=512)),
    "pythia-1.4b": (
        "gpt_neox",
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=8192,
            max_position_embeddings=2048,
            vocab_size=50304,
            rotary_pct=0.25,
        ),
    ),
    "pythia-6.9b": (
        "gpt_neox",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            intermediate_size=16384,
            max_position_embeddings=2048,
            vocab_size=50432,
            rotary_pct=0.25,
        ),
    ),
    "gpt-neox-20b": (
        "gpt_neox",
        dict(
            hidden_size=6144,
            num_hidden_layers=44,
            num_attention_heads=64,
            intermediate_size=24576,
            max_position_embeddings=2048,
            vocab_size=50432,
            rotary_pct=0.25,
        ),
    ),
    "llama-7b": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            intermediate_size=11008,
            max_position_embeddings=2048,
            vocab_size=32000,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-3-8b": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            max_position_embeddings=8192,
            vocab_size=128256,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
        ),
    ),
}


def preset_config(name: str, vocab_size: int | None = None):
    """The transformers config of preset `name`; tiny presets grow their vocab to fit `vocab_size`."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise UserError(f"--model preset:{name}: unknown preset; choose one of {', '.join(PRESETS)}")
    model_type, kwargs = PRESETS[name]
    kwargs = dict(kwargs)
    if name.startswith("tiny-") and vocab_size:
        kwargs["vocab_size"] = -(-vocab_size // 64) * 64
    config = AutoConfig.for_model(model_type, **kwargs)
    config.use_cache = False
    return config


def check_model_dir(path: str) -> None:
    """Fail early, naming the file, if the model dir is not there or its weights are damaged."""
    if not os.path.isdir(path):
        raise UserError(f"--model {path}: not a directory; give a local Hugging Face model dir or preset:NAME")
    read_model_dir(path, "--model")


def attention_implementation(requested: str, packed: bool = False) -> str:
    """The attention that `requested` means here. auto: FlexAttention for packed rows on a GPU (transformers builds a
    block-sparse mask from the position ids; a dense [B, 1, L, L] mask would keep SDPA off its flash kernels), else
    SDPA (the CPU path, with lora_ds.packing's dense mask for packed rows)."""
    if requested != "auto":
        return requested
    return "flex_attention" if packed and torch.cuda.is_available() else "sdpa"


def build_model(
    name: str, dtype: str, ds_config: dict | None, attn_implementation: str = "sdpa", vocab_size: int | None = None
):
    """(model, keepalive): the base model, partitioned under ZeRO-3 when `ds_config` says stage 3.

    `keepalive` is transformers' HfDeepSpeedConfig, which must outlive engine creation so that
    transformers knows weights are partitioned.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from lora_ds.zero import zero3_enabled

    keepalive = HfDeepSpeedConfig(ds_config) if ds_config and zero3_enabled(ds_config) else None
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attention_implementation(attn_implementation))
    if name.startswith("preset:"):
        model = AutoModelForCausalLM.from_config(preset_config(name[len("preset:") :], vocab_size), **kwargs)
    else:
        check_model_dir(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.config.use_cache = False
    return model, keepalive


def default_targets(model) -> list[str]:
    from lora_ds.lora import DEFAULT_TARGETS

    model_type = model.config.model_type
    if model_type not in DEFAULT_TARGETS:
        raise UserError(f"no default LoRA targets for model type {model_type!r}; pass --lora_targets")
    return DEFAULT_TARGETS[model_type]
