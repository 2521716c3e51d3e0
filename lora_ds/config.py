"""The run configuration: one typed dataclass tree, defaults < config file < command-line flags.

Every field documents itself and names its flag; `parse_config(argv)` builds the parser from these
fields, so a flag, a config-file key and a `run_config.json` entry are always the same thing.
Each value is converted to its field's type by `convert`, whether it came as flag text or from a file.
The DeepSpeed batch math lives here, in `resolve_ds_config`, and nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from lora_ds.errors import UserError

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launcher", "demo")


def _f(default, flag: str, help: str, **kw):
    """A config field: its default, its command-line flag (underscores, as the config-file key) and help."""
    return field(default=default, metadata={"flag": flag, "help": help, **kw})


def flag_spellings(flag: str) -> tuple[str, ...]:
    """A flag and its hyphenated alias: every lora-ds command spells flags with underscores (the config-file
    keys) and also accepts hyphens, so `--max_len` and `--max-len` are the same flag everywhere."""
    hyphenated = "--" + flag[2:].replace("_", "-")
    return (flag,) if hyphenated == flag else (flag, hyphenated)


class FieldError(UserError):
    """A config field has a bad value. The message names the field (`lora.r 0: ...`); `parse_config`
    restates it with the flag, or the config file, the value came from."""

    def __init__(self, key: str, value, reason: str):
        super().__init__(f"{key} {value}: {reason}")
        self.key, self.value, self.reason = key, value, reason


_ACCEPTED = {int: int, float: (int, float), str: str, bool: bool, type(None): type(None)}
_DESCRIBED = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list ({_describe(typing.get_args(hint)[0])} each)"
    if typing.get_origin(hint) is dict:
        return f"a mapping NAME=VALUE,... (each VALUE {_describe(typing.get_args(hint)[1])})"
    return _DESCRIBED[hint]


def convert(value, hint, key: str):
    """`value` as the type `hint` (int, float, str, bool, None, list[...] and unions of them), or a FieldError.

    Text (a flag's, or a string in a config file) of an int or float field is parsed as Python's int() or
    float() does, so `lr: 2e-4` (a string to PyYAML) is 0.0002 and `seed: "7"` is 7, like `--seed 7`;
    `seed: "seven"` or `seed: 2.5` is an error. Other values must already have the type: an int is a
    float, a bool is not a number, and a bool field (a switch on the command line) takes only true/false.
    A union takes the first of its types that fits.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(hint):
            with contextlib.suppress(FieldError):
                return convert(value, member, key)
    elif origin is list:
        if isinstance(value, list):
            return [convert(item, typing.get_args(hint)[0], key) for item in value]
    elif origin is dict:
        if isinstance(value, str):
            value = _mapping_text(value, key)
        if isinstance(value, dict):
            key_hint, value_hint = typing.get_args(hint)
            return {convert(k, key_hint, key): convert(v, value_hint, key) for k, v in value.items()}
    elif isinstance(value, str) and hint in (int, float):
        with contextlib.suppress(ValueError):
            return hint(value)
    elif isinstance(value, _ACCEPTED[hint]) and isinstance(value, bool) == (hint is bool):
        return float(value) if hint is float else value
    raise FieldError(key, value, f"expected {_describe(hint)}")


def _mapping_text(text: str, key: str) -> dict:
    """`NAME=VALUE,NAME=VALUE` (a flag's text of a mapping field) as a dict, in its order."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if any(not sep or not name.strip() for name, sep, _ in pairs):
        raise FieldError(key, text, "expected NAME=VALUE pairs, comma-separated")
    return {name.strip(): value.strip() for name, _, value in pairs}


def _typed(cfg) -> None:
    """Convert every field of the section `cfg` to its declared type (first thing in each __post_init__)."""
    # get_type_hints: with `from __future__ import annotations` a dataclass field's .type is only a string.
    for name, hint in typing.get_type_hints(type(cfg)).items():
        setattr(cfg, name, convert(getattr(cfg, name), hint, _key(cfg, name)))


def _require(cfg, name: str, ok: bool, reason: str) -> None:
    if not ok:
        raise FieldError(_key(cfg, name), getattr(cfg, name), reason)


def _key(cfg, name: str) -> str:
    """The field as a config file spells it: lora.r."""
    section = next(s for s, cls in SECTION_TYPES.items() if cls is type(cfg))
    return f"{section}.{name}"


ATTENTIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")


@dataclass
class ModelConfig:
    name: str = _f(
        "preset:tiny-gpt-neox",
        "--model",
        "a local Hugging Face model dir, or preset:NAME (random weights; see lora_ds/model.py)",
    )
    tokenizer: str | None = _f(
        None, "--tokenizer", "tokenizer dir or tokenizer.model; default: the model dir (the demo's for presets)"
    )
    dtype: str = _f("bf16", "--dtype", "compute dtype: bf16 or fp32 (fp32 master weights either way)")
    grad_ckpt: bool = _f(False, "--grad_ckpt", "activation (gradient) checkpointing of the transformer blocks")
    attn_implementation: str = _f(
        "auto",
        "--attn_implementation",
        "auto (FlexAttention for packed data on a GPU, else sdpa; for an architecture without that one, FlexAttention "
        "on a GPU or eager), sdpa, eager, flex_attention or flash_attention_2",
    )
    kernels: str = _f(
        "auto",
        "--kernels",
        "fused GPU kernels (Liger: norms, RoPE, MLP, LM-head loss): auto (when a CUDA device and "
        "liger-kernel are there), liger, or off (the plain PyTorch path)",
    )
    zero3_fetch: str = _f(
        "layer",
        "--zero3_fetch",
        "ZeRO-3 gathering unit: layer (one hook per decoder layer gathers all its weights) or "
        "module (a hook per Linear/norm)",
    )
    add_tokens: str | None = _f(
        None,
        "--add_tokens",
        "tokens to add to the tokenizer: a file of one token a line, or template:NAME (a built-in chat template's "
        "special tokens: chatml, llama3); the input embedding and output head grow to fit them (new rows: the mean "
        "of the old), are trained in full (added to --modules_to_save) and saved with the adapter and the tokenizer",
    )
    quantize: str | None = _f(
        None,
        "--quantize",
        "QLoRA: nf4 stores the frozen base's Linear weights (all but the output head) in 4-bit NF4 through "
        "bitsandbytes, double-quantized, packed in the --dtype storage so that ZeRO-3 partitions them",
    )

    def __post_init__(self):
        _typed(self)
        _require(self, "quantize", self.quantize in (None, "nf4"), "choose nf4 (or leave it unset)")
        _require(self, "dtype", self.dtype in ("bf16", "fp32"), "choose bf16 or fp32 (fp16 is not supported)")
        _require(self, "attn_implementation", self.attn_implementation in ATTENTIONS, f"choose {', '.join(ATTENTIONS)}")
        _require(self, "kernels", self.kernels in ("auto", "liger", "off"), "choose auto, liger or off")
        _require(self, "zero3_fetch", self.zero3_fetch in ("layer", "module"), "choose layer or module")
        if self.add_tokens == "":
            self.add_tokens = None


@dataclass
class LoraConfig:
    r: int = _f(8, "--lora_r", "rank r of the update B·A")
    alpha: float = _f(16.0, "--lora_alpha", "scale numerator: s = alpha / r")
    dropout: float = _f(0.0, "--lora_dropout", "dropout on the LoRA path's input")
    targets: list[str] | str | None = _f(
        None,
        "--lora_targets",
        "module names (comma-separated, PEFT's suffix rule), a regex (re:PATTERN, whole name) or all-linear "
        "(every Linear but the output head, as PEFT); default: the family's attention query and value "
        "projections (lora_ds/families.py)",
    )
    rslora: bool = _f(False, "--rslora", "rank-stabilized scale s = alpha / sqrt(r)")
    modules_to_save: list[str] | str | None = _f(
        None,
        "--modules_to_save",
        "modules trained in full beside the LoRA (comma-separated, PEFT's modules_to_save: a module whose name ends "
        "with an entry), e.g. lm_head,embed_tokens; saved whole in the adapter, written into the merged model",
    )
    rank_pattern: dict[str, int] | None = _f(
        None,
        "--lora_rank_pattern",
        "per-module ranks, NAME=R,... (a config file: a mapping), PEFT's rank_pattern: NAME is a regex matched "
        "against the end of a module name (e.g. layers\\.[0-3]\\.attention\\.query_key_value=64); the first "
        "key that matches wins; other modules get --lora_r",
    )
    alpha_pattern: dict[str, float] | None = _f(
        None,
        "--lora_alpha_pattern",
        "per-module alphas, NAME=A,..., PEFT's alpha_pattern (matched as --lora_rank_pattern); other modules get "
        "--lora_alpha; s = alpha / r with the module's own r",
    )
    use_dora: bool = _f(
        False, "--use_dora", "DoRA: a trainable magnitude per output feature rescales each row of W0 + s·B·A (PEFT's)"
    )
    init_lora_weights: str = _f(
        "default",
        "--init_lora_weights",
        "initial factors, PEFT's init_lora_weights: default (A kaiming-uniform, B = 0), gaussian (A ~ N(0, std 1/r), "
        "B = 0), pissa / pissa_niter_N (A, B from W0's top-r singular vectors, exact SVD or N-iteration randomized) "
        "or olora (from W0's QR); pissa and olora train on the residual W0 - s·B0·A0, and the saved adapter is a "
        "rank-2r LoRA of the original base (lora_ds/lora.py)",
    )

    def __post_init__(self):
        _typed(self)
        _require(self, "r", self.r > 0, "the rank must be a positive integer")
        _require(self, "alpha", self.alpha > 0, "alpha must be positive")
        _require(self, "dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        if isinstance(self.targets, str) and not self.targets.startswith("re:"):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self._patterns()
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [m.strip() for m in self.modules_to_save.split(",") if m.strip()]
        self.modules_to_save = self.modules_to_save or None
        self._init_weights()
        if isinstance(self.targets, list) and len(self.targets) > 1:
            alone = "all-linear" not in map(str.lower, self.targets)
            _require(self, "targets", alone, "all-linear stands alone, not beside module names")

    def _patterns(self) -> None:
        import re

        self.rank_pattern, self.alpha_pattern = self.rank_pattern or {}, self.alpha_pattern or {}
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in patterns.items():
                try:
                    re.compile(key)
                except re.error as e:
                    raise FieldError(_key(self, name), key, f"not a regular expression ({e})") from e
                # PEFT refuses a rank below 1 when it builds the layer; a non-positive alpha is refused as --lora_alpha.
                if value <= 0:
                    what = "rank" if name == "rank_pattern" else "alpha"
                    raise FieldError(_key(self, name), f"{key}={value}", f"the {what} must be positive")

    def _init_weights(self) -> None:
        from lora_ds.lora import INITS, mutates_base, pissa_niter

        init = self.init_lora_weights
        if init not in INITS:
            try:
                pissa_niter(init)
            except ValueError:
                _require(self, "init_lora_weights", False, f"choose {', '.join(INITS)} or pissa_niter_N (N >= 0)")
        if not mutates_base(init):
            return
        # PEFT builds both, but its conversion to an adapter of the original base (subtract_mutated_init) drops
        # the magnitudes, and refuses rsLoRA with patterns (alpha_pattern doubled would change s): the adapters
        # lora-ds saves would not apply to the base.
        _require(
            self,
            "init_lora_weights",
            not self.use_dora,
            "DoRA with PiSSA/OLoRA is not supported: PEFT's conversion of the adapter to the original base drops "
            "DoRA's magnitudes; use one or the other",
        )
        _require(
            self,
            "init_lora_weights",
            not (self.rslora and (self.rank_pattern or self.alpha_pattern)),
            "PiSSA/OLoRA with rsLoRA and a rank or alpha pattern cannot be converted to an adapter of the original "
            "base (PEFT refuses it too); drop --rslora or the patterns",
        )

    def target_spec(self):
        """A list of names, or the regex string (without its `re:` prefix)."""
        if isinstance(self.targets, str):
            return self.targets[len("re:") :]
        return self.targets


@dataclass
class DataConfig:
    path: str = _f(
        os.path.join(DEMO_DIR, "train.jsonl"),
        "--data",
        "prepared dir (lora-ds prep) or JSONL of {prompt, completion} records",
    )
    eval_path: str | None = _f(
        os.path.join(DEMO_DIR, "eval.jsonl"),
        "--eval_data",
        "held-out split for eval loss (same formats); empty string: none",
    )
    max_len: int = _f(512, "--max_len", "tokens per example (JSONL input; prepared dirs are already cut)")
    eval_task: str | None = _f(
        None,
        "--eval_task",
        "generation eval during training, TASK:FILE: wikisql, mnli or samsum and a validation "
        "file as `lora-ds eval --data` reads it; scored with the task's metrics when eval "
        "loss is (--eval_every)",
    )
    eval_task_samples: int = _f(64, "--eval_task_samples", "examples of --eval_task drawn (with --seed) for it")

    def __post_init__(self):
        from lora_ds.tasks import TASKS

        _typed(self)
        _require(self, "max_len", self.max_len >= 2, "must be at least 2")
        if self.eval_path == "":
            self.eval_path = None
        if self.eval_task == "":
            self.eval_task = None
        if self.eval_task is not None:
            task, _, path = self.eval_task.partition(":")
            _require(
                self,
                "eval_task",
                task in TASKS and bool(path),
                f"expected TASK:FILE with TASK one of {', '.join(TASKS)}, e.g. wikisql:data/wikisql/dev.jsonl",
            )
        _require(self, "eval_task_samples", self.eval_task_samples >= 1, "must be at least 1")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/demo", "--output_dir", "where checkpoints, metrics and the adapter go")
    ds_config: str = _f("ds_configs/zero3.json", "--ds_config", "DeepSpeed config (JSON); 'auto' values are filled")
    lr: float = _f(2e-4, "--lr", "peak learning rate (AdamW)")
    loraplus_lr_ratio: float | None = _f(
        None,
        "--loraplus_lr_ratio",
        "LoRA+ (Hayou et al. 2024, PEFT's create_loraplus_optimizer): lora_B learns at --lr × this ratio, lora_A at "
        "--lr (the paper suggests 16); default: off, one lr for both",
    )
    weight_decay: float = _f(0.1, "--weight_decay", "AdamW weight decay on the LoRA factors")
    warmup: int = _f(0, "--warmup", "linear warm-up steps; then linear decay to 0 at the last step")
    max_steps: int = _f(0, "--max_steps", "optimizer steps; 0: derive from --epochs")
    epochs: float = _f(1.0, "--epochs", "passes over the data when --max_steps is 0")
    micro_batch: int = _f(4, "--micro_batch", "sequences per rank per forward")
    grad_accum: int = _f(1, "--grad_accum", "micro-batches accumulated per optimizer step")
    max_grad_norm: float = _f(1.0, "--max_grad_norm", "gradient clipping (global L2 norm); 0: off")
    seed: int = _f(42, "--seed", "seed of the LoRA init, data order and dropout")
    log_every: int = _f(1, "--log_every", "steps between metrics.jsonl lines")
    report_to: list[str] | str = _f(
        "none",
        "--report_to",
        "trackers that also get metrics.jsonl's records, comma-separated: tensorboard (OUTPUT/tensorboard/), "
        "wandb (OUTPUT/wandb/, offline unless WANDB_MODE says otherwise), or none",
    )
    eval_every: int = _f(0, "--eval_every", "steps between eval-loss passes; 0: only at the end")
    save_every: int = _f(0, "--save_every", "steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = _f(2, "--keep_checkpoints", "newest checkpoints kept; older ones are deleted")
    resume: str = _f("auto", "--resume", "auto (latest checkpoint if any), never, or a checkpoint tag")
    halt_at_step: int = _f(0, "--halt_at_step", "save and stop after this step, as a preemption would (0: off)")
    max_skipped_steps: int = _f(
        10, "--max_skipped_steps", "steps with NaN/Inf gradients skipped before the run stops at its last checkpoint"
    )

    def __post_init__(self):
        _typed(self)
        for name in ("micro_batch", "grad_accum", "log_every"):
            _require(self, name, getattr(self, name) >= 1, "must be at least 1")
        for name in (
            "warmup",
            "max_steps",
            "eval_every",
            "save_every",
            "halt_at_step",
            "max_grad_norm",
            "weight_decay",
            "max_skipped_steps",
        ):
            _require(self, name, getattr(self, name) >= 0, "must not be negative")
        _require(self, "keep_checkpoints", self.keep_checkpoints >= 1, "keep at least 1")
        _require(self, "lr", self.lr > 0, "must be positive")
        ratio = self.loraplus_lr_ratio
        _require(self, "loraplus_lr_ratio", ratio is None or ratio > 0, "must be positive (B's lr is lr × ratio)")
        _require(self, "epochs", self.max_steps > 0 or self.epochs > 0, "must be positive when max_steps is 0")
        self._trackers()

    def _trackers(self) -> None:
        from lora_ds.tracking import PACKAGES

        names = self.report_to
        if isinstance(names, str):
            names = [] if names == "none" else [n.strip() for n in names.split(",") if n.strip()]
        _require(
            self, "report_to", set(names) <= set(PACKAGES), f"choose {', '.join(PACKAGES)} (comma-separated) or none"
        )
        self.report_to = list(dict.fromkeys(names))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        # Checked here too, before any rank starts (inject_lora refuses it for library callers).
        from lora_ds.lora import refuse_pissa_on_4bit

        refuse_pissa_on_4bit(self.lora.init_lora_weights, self.model.quantize is not None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTION_TYPES = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}


def _flag_fields():
    for section, cls in SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            yield section, f


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    with open(path) as fh:
        text = fh.read()
    import yaml

    try:
        data = (yaml.safe_load(text) or {}) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot parse ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections ({', '.join(SECTION_TYPES)})")
    for section, values in data.items():
        if section not in SECTION_TYPES:
            raise UserError(f"{path}: unknown section {section!r}; sections are {', '.join(SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise UserError(f"{path}: section {section!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(SECTION_TYPES[section])}
        for key in values:
            if key not in known:
                raise UserError(f"{path}: unknown key {section}.{key}; known keys: {', '.join(sorted(known))}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LoRA fine-tuning on DeepSpeed ZeRO-3")
    parser.add_argument(
        *flag_spellings("--config"), help="YAML or JSON file with sections model/lora/data/train; flags override it"
    )
    # The deepspeed launcher appends --local_rank; the rank itself is read from the environment.
    parser.add_argument(*flag_spellings("--local_rank"), type=int, default=None, help=argparse.SUPPRESS)
    for section, f in _flag_fields():
        # A bool is a switch; any other flag is read as text, which the field converts as it does a file's value.
        is_switch = typing.get_type_hints(SECTION_TYPES[section])[f.name] is bool
        kind = {"action": argparse.BooleanOptionalAction} if is_switch else {"metavar": f.name.upper()}
        parser.add_argument(
            *flag_spellings(f.metadata["flag"]),
            dest=f"{section}.{f.name}",
            default=None,
            help=f"{f.metadata['help']} (default: {f.default})",
            **kind,
        )
    return parser


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Resolve defaults < --config file < flags into a validated RunConfig.

    A bad value is reported with its flag, and also with its key and file when the config file gave it.
    """
    args = build_parser().parse_args(argv)
    values = {section: {} for section in SECTION_TYPES}
    given_in = {}  # "lora.r" -> the config file that set it, unless a flag overrides it
    if args.config:
        for section, items in _read_config_file(args.config).items():
            values[section].update(items)
            given_in.update({f"{section}.{key}": args.config for key in items})
    for section, f in _flag_fields():
        flag_value = getattr(args, f"{section}.{f.name}")
        if flag_value is not None:
            values[section][f.name] = flag_value
            given_in.pop(f"{section}.{f.name}", None)
    try:
        return RunConfig(**{section: SECTION_TYPES[section](**values[section]) for section in SECTION_TYPES})
    except FieldError as e:
        raise as_flag_error(e, given_in.get(e.key)) from e


def as_flag_error(e: FieldError, config_file: str | None = None) -> UserError:
    """`e` restated with the flag of its field (and the config file the value came from, if one did)."""
    flag = next(f.metadata["flag"] for section, f in _flag_fields() if f"{section}.{f.name}" == e.key)
    where = f" ({e.key} in {config_file})" if config_file else ""
    return UserError(f"{flag} {e.value}{where}: {e.reason}")


def load_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--ds_config {path}: no such file; see ds_configs/ for the shipped ones")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def _fill(ds: dict, key: str, value, path: str, source: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise UserError(
            f'{path}: {key} is {current!r} but {source} gives {value!r}; set it to "auto" or make them agree'
        )


def resolve_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config of this run: the file's settings, with batch math, clipping and dtype filled.

    train_batch_size = micro_batch × grad_accum × world_size is the one batch rule; any value the
    file sets explicitly must agree with the flags.
    """
    path = cfg.train.ds_config
    ds = copy.deepcopy(load_ds_config(path))
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch, path, "--micro_batch")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, path, "--grad_accum")
    _fill(
        ds,
        "train_batch_size",
        t.micro_batch * t.grad_accum * world_size,
        path,
        f"--micro_batch × --grad_accum × world size ({t.micro_batch} × {t.grad_accum} × {world_size})",
    )
    _fill(ds, "gradient_clipping", t.max_grad_norm, path, "--max_grad_norm")
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", cfg.model.dtype == "bf16", path + " bf16", "--dtype")
    if ds.get("fp16", {}).get("enabled") in (True, "auto"):
        raise UserError(f"{path}: fp16 is not supported; use bf16 (set fp16.enabled to false)")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") not in (2, 3):
        raise UserError(f"{path}: zero_optimization.stage must be 2 or 3, got {zero.get('stage')!r}")
    if zero.get("zero_hpz_partition_size") == "auto":
        from lora_ds.dist import ranks_per_node

        # ZeRO++ hpZ: a second copy of the frozen weights sharded within each node, gathered over NVLink.
        zero["zero_hpz_partition_size"] = ranks_per_node()
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(
                f"{path}: remove the {key!r} section; lora-ds builds AdamW and its schedule from "
                f"--lr, --weight_decay and --warmup"
            )
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer synchronizes the device at each forward's start and each step's end, draining
    # the GPU's queue twice a step; MetricsLog measures tok/s itself without a sync.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds
