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

# The shape of every tiny Llama-like preset: GQA (4 query heads, 2 KV heads), a SwiGLU/GeGLU MLP.
TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=176,
    max_position_embeddings=1024,
    vocab_size=512,
)

# (model_type, config kwargs). Big shapes follow the published configs (config.json of the named checkpoint).
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
    "tiny-llama": ("llama", dict(TINY_SHAPE)),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=512)),
    # Today's families at the same tiny size, each keeping what sets it apart: Llama 3's rope scaling and (3.2's)
    # tied embeddings, Qwen2's q/k/v biases, Qwen3's q/k norms, sliding windows (Mistral, Gemma) short enough to
    # act on short rows, Gemma 3's sliding and full layers, Phi-3's fused qkv_proj and gate_up_proj.
    "tiny-llama3": (
        "llama",
        dict(
            TINY_SHAPE,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "tiny-qwen2": ("qwen2", dict(TINY_SHAPE)),
    "tiny-qwen3": ("qwen3", dict(TINY_SHAPE, head_dim=16)),
    "tiny-mistral": ("mistral", dict(TINY_SHAPE, head_dim=16, sliding_window=32)),
    "tiny-gemma2": ("gemma2", dict(TINY_SHAPE, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)),
    "tiny-gemma3": (
        "gemma3_text",
        dict(
            TINY_SHAPE,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "tiny-phi3": ("phi3", dict(TINY_SHAPE, pad_token_id=0, eos_token_id=2)),
    "tiny-cohere": ("cohere", dict(TINY_SHAPE, eos_token_id=2)),
    "tiny-granite": ("granite", dict(TINY_SHAPE, logits_scaling=8.0)),
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
    "qwen2.5-7b": (  # Qwen/Qwen2.5-7B
        "qwen2",
        dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            max_position_embeddings=131072,
            vocab_size=152064,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
        ),
    ),
    "qwen3-8b": (  # Qwen/Qwen3-8B
        "qwen3",
        dict(
            hidden_size=4096,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=12288,
            max_position_embeddings=40960,
            vocab_size=151936,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
        ),
    ),
    "mistral-7b": (  # mistralai/Mistral-7B-v0.3
        "mistral",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=14336,
            max_position_embeddings=32768,
            vocab_size=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
        ),
    ),
    "gemma-2-9b": (  # google/gemma-2-9b
        "gemma2",
        dict(
            hidden_size=3584,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            intermediate_size=14336,
            max_position_embeddings=8192,
            vocab_size=256000,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            rms_norm_eps=1e-6,
        ),
    ),
    "phi-3-mini": (  # microsoft/Phi-3-mini-4k-instruct
        "phi3",
        dict(
            hidden_size=3072,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=8192,
            max_position_embeddings=4096,
            vocab_size=32064,
            rms_norm_eps=1e-5,
            pad_token_id=32000,
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


def model_config(name: str, vocab_size: int | None = None):
    """The transformers config of `name`: preset:NAME (see `preset_config`) or a model dir."""
    from transformers import AutoConfig

    if name.startswith("preset:"):
        return preset_config(name[len("preset:") :], vocab_size)
    check_model_dir(name)
    return AutoConfig.from_pretrained(name)


# The class flag by which transformers says that an architecture runs an attention implementation.
_SUPPORT_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
}


def supported_attentions(config) -> list[str]:
    """The attention implementations that the causal-LM class of `config` runs (eager always)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"--model: model type {config.model_type!r} has no causal-LM class in transformers")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return ["eager"] + [name for name, flag in _SUPPORT_FLAGS.items() if getattr(model_class, flag, False)]


def attention_implementation(requested: str, config, packed: bool = False) -> str:
    """The attention that `requested` means for a model of `config`; `packed`: the rows are.

    auto: FlexAttention for packed rows on a GPU (transformers builds a block-sparse mask from the position ids; a
    dense [B, 1, L, L] mask would keep SDPA off its flash kernels), else SDPA (the CPU path, with lora_ds.packing's
    dense mask for packed rows). An architecture without that one (Gemma 2 has no SDPA: its attention logits are
    soft-capped) gets FlexAttention on a GPU, else eager, and the run says so once. A named implementation is
    honoured, or refused when the architecture has not got it.
    """
    supported = supported_attentions(config)
    if requested != "auto":
        if requested not in supported:
            raise UserError(
                f"--attn_implementation {requested}: {config.model_type} models do not support it; "
                f"choose {', '.join(supported)} or auto"
            )
        return requested
    cuda = torch.cuda.is_available()
    wanted = "flex_attention" if packed and cuda else "sdpa"
    if wanted in supported:
        return wanted
    fallback = "flex_attention" if cuda and "flex_attention" in supported else "eager"
    _say_once(f"--attn_implementation auto: {config.model_type} models have no {wanted} attention; using {fallback}")
    return fallback


def has_sliding_window(config) -> bool:
    """Whether some layer of a model of `config` attends within a sliding window (Mistral v0.1, Gemma 2/3, Phi-3,
    Qwen2 with use_sliding_window): its `layer_types` say so, or, without them, its `sliding_window`."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types
    return getattr(config, "sliding_window", None) is not None


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Print `message` the first time, on rank 0 only."""
    import torch.distributed as dist

    if message in _SAID or (dist.is_initialized() and dist.get_rank() != 0):
        return
    _SAID.add(message)
    print(message, flush=True)


def build_model(
    name: str,
    dtype: str,
    ds_config: dict | None,
    attn_implementation: str = "auto",
    vocab_size: int | None = None,
    packed: bool = False,
    quantize: str | None = None,
):
    """(model, keepalive): the base model, partitioned under ZeRO-3 when `ds_config` says stage 3, with the
    attention that `attention_implementation` picks (`model.config._attn_implementation`); with `quantize`
    ("nf4"), its Linear weights in 4-bit on this rank's device (`lora_ds.quantize`), partitioned only when
    the engine is built.

    `keepalive` is transformers' HfDeepSpeedConfig, which must outlive engine creation so that
    transformers knows weights are partitioned.
    """
    from transformers.integrations import HfDeepSpeedConfig

    from lora_ds.zero import zero3_enabled

    zero3 = bool(ds_config and zero3_enabled(ds_config))
    # A quantized base is built whole (no zero.Init): it must not see the DeepSpeed config until it exists.
    keepalive = HfDeepSpeedConfig(ds_config) if zero3 and not quantize else None
    config = model_config(name, vocab_size)
    attention = attention_implementation(attn_implementation, config, packed)
    model = _load(name, config, dict(dtype=DTYPES[dtype], attn_implementation=attention), quantize)
    model.config.use_cache = False
    if zero3 and quantize:
        keepalive = HfDeepSpeedConfig(ds_config)
    return model, keepalive


def _load(name: str, config, kwargs: dict, quantize: str | None):
    from transformers import AutoModelForCausalLM

    if not quantize:
        if name.startswith("preset:"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
        return AutoModelForCausalLM.from_pretrained(name, config=config, **kwargs)
    from lora_ds.quantize import bnb_config, build_preset, local_device, require_bitsandbytes

    require_bitsandbytes()
    device = local_device()
    if name.startswith("preset:"):
        return build_preset(config, kwargs, device)
    # transformers quantizes each weight as it loads it onto the device.
    return AutoModelForCausalLM.from_pretrained(
        name, config=config, quantization_config=bnb_config(kwargs["dtype"]), device_map={"": device}, **kwargs
    )
