"""PEFT-format adapters (adapter_config.json + adapter_model.safetensors) and what makes one valid.

Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (and DoRA's `.lora_magnitude_vector`,
with `use_dora: true` in the config), and `base_model.model.<module>.<param>` of each module trained in full (the
config's `modules_to_save`, lora_ds.saved_modules; `ensure_weight_tying: true` when it is a matrix that tied input
and output embeddings share, saved under both names), as PEFT writes them, so
`peft.PeftModel.from_pretrained(base, dir)` loads what we write and we load what PEFT writes.

An adapter dir always applies to the original base. A PiSSA/OLoRA run trains on a residual base, so its adapter
is converted as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` converts it
(`to_original_base`): a plain LoRA of rank 2r, `init_lora_weights: true`. Only a checkpoint tag holds the
unconverted factors (with its initial factors beside them, lora_ds.checkpoint_files); a PEFT adapter saved without
that conversion is refused, since applied to the original base it would be wrong.

`check_config` and `check_lora` are the one definition of a valid adapter: every reader and writer of LoRA
tensors (export, merge, analyze, eval, `read_adapter`, `write_adapter`) goes through them, so a new variant
of the format (DoRA, rank patterns, modules_to_save) is taught here once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lora_ds.dtypes import torch_dtype
from lora_ds.errors import UserError
from lora_ds.fsutil import atomic_dir, read_json, write_json, write_text
from lora_ds.lora import is_target, lora_scale, mutates_base, pattern_value

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RUN_CONFIG = "run_config.json"
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m, one per output feature
SUFFIXES = (LORA_A, LORA_B, MAGNITUDE)


@dataclass
class LoRAWeights:
    """A checked LoRA tensor set, its adapter config, where it was read, and the run config beside it."""

    config: dict  # adapter_config.json (PEFT's LoraConfig fields)
    tensors: dict  # {"<module>.lora_A.weight": tensor, ...}
    source: str
    run_config: dict | None = None

    @property
    def modules(self) -> list[str]:
        return adapted_modules(self.tensors)


def peft_config(
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules,
    use_rslora: bool,
    fan_in_fan_out: bool,
    base_model: str,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
    ensure_weight_tying: bool = False,
    init_lora_weights: str = "default",
) -> dict:
    """The adapter_config.json PEFT reads (LoraConfig fields). `init_lora_weights`: LoraConfig's; PEFT writes
    true for its default."""
    tying = {"ensure_weight_tying": True} if ensure_weight_tying else {}
    return tying | {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True if init_lora_weights == "default" else init_lora_weights,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "use_dora": use_dora,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
    }


def module_rank(config: dict, module: str | None = None) -> int:
    """The rank of `module` (PEFT's rank_pattern rule, lora_ds.lora.pattern_value); `r` for None."""
    return config["r"] if module is None else pattern_value(config.get("rank_pattern") or {}, module, config["r"])


def scaling(config: dict, module: str | None = None) -> float:
    """s of `module` (its own rank and alpha, as PEFT's rank_pattern / alpha_pattern give them); None: of `r`."""
    alpha = config["lora_alpha"]
    if module is not None:
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, alpha)
    return lora_scale(module_rank(config, module), alpha, bool(config.get("use_rslora")))


def inject_adapter(model, config: dict, targets=None) -> list[str]:
    """Wrap `model`'s modules selected by `targets` (default: the config's target_modules) in LoRA layers of the
    ranks and scales `config` gives them (no dropout: for merge and eval). Returns the adapted names."""
    from lora_ds.lora import inject_lora

    return inject_lora(
        model,
        config["target_modules"] if targets is None else targets,
        config["r"],
        float(config["lora_alpha"]),
        0.0,
        bool(config.get("use_rslora")),
        rank_pattern=config.get("rank_pattern") or None,
        alpha_pattern=config.get("alpha_pattern") or None,
        use_dora=bool(config.get("use_dora")),
    )


def adapted_modules(tensors: dict) -> list[str]:
    """The modules that `tensors` hold LoRA tensors of, sorted."""
    return sorted({n[: -len(s)] for n in tensors for s in SUFFIXES if n.endswith(s)})


def saved_tensors(tensors: dict) -> dict:
    """{"<module>.<param>": T} of the modules trained in full (modules_to_save): every tensor that is not LoRA's."""
    return {n: t for n, t in tensors.items() if not n.endswith(SUFFIXES)}


def magnitude(tensors: dict, module: str) -> torch.Tensor | None:
    """DoRA's magnitude vector (out,) of `module`; None for plain LoRA."""
    return tensors.get(module + MAGNITUDE)


def factors(tensors: dict, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of `module`."""
    return tensors[module + LORA_A], tensors[module + LORA_B]


def to_original_base(tensors: dict, config: dict, init: dict, source: str = "the adapter") -> tuple[dict, dict]:
    """(tensors, config) of a plain LoRA of the original base W0, from a PiSSA/OLoRA adapter trained on the residual
    W_res = W0 - s·B0·A0 and its initial factors `init` (PEFT's `subtract_mutated_init` and save_pretrained):

        W_res + s·B·A = W0 + s·(B·A - B0·A0) = W0 + s·[B | -B0]·[A ; A0]

    so A' = cat[A, A0] (dim 0), B' = cat[B, -B0] (dim 1), with r, lora_alpha, rank_pattern and alpha_pattern doubled
    (s unchanged; with rsLoRA lora_alpha × sqrt(2) instead, which PEFT refuses beside a pattern) and
    init_lora_weights true. DoRA magnitudes (none: refused with PiSSA/OLoRA) would pass unchanged."""
    converted = dict(tensors)
    for module in adapted_modules(tensors):
        A, B = factors(tensors, module)
        if module + LORA_A not in init or module + LORA_B not in init:
            raise UserError(f"{source}: the initial factors hold no {module}; they belong to another run")
        A0, B0 = init[module + LORA_A], init[module + LORA_B]
        if A0.shape != A.shape or B0.shape != B.shape:
            raise UserError(
                f"{source}: the initial factors of {module} are {list(A0.shape)} / {list(B0.shape)}, its trained ones "
                f"{list(A.shape)} / {list(B.shape)}; they belong to another run"
            )
        converted[module + LORA_A] = torch.cat([A.float(), A0.float()], dim=0)
        converted[module + LORA_B] = torch.cat([B.float(), -B0.float()], dim=1)
    config = dict(config)
    config["r"] *= 2
    config["lora_alpha"] *= 2**0.5 if config.get("use_rslora") else 2
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    return converted, config


def check_config(config: dict, path: str, residual_base: bool = False) -> dict:
    """`config` (read from `path`), once it is known to be a PEFT LoRA config with the fields readers use.
    `residual_base`: a checkpoint tag's, whose init_lora_weights may be pissa/olora (an adapter's may not)."""
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported")
    for field, kinds, what in (("r", int, "a positive integer"), ("lora_alpha", (int, float), "a positive number")):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            raise UserError(f"{path}: field {field!r} must be {what}, got {value!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, str) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise UserError(f"{path}: field 'target_modules' must be a list of module names or a regex, got {targets!r}")
    for field, kinds in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        patterns = config.get(field) or {}
        bad = [f"{k}={v!r}" for k, v in patterns.items() if isinstance(v, bool) or not isinstance(v, kinds) or v <= 0]
        if not isinstance(patterns, dict) or bad:
            raise UserError(
                f"{path}: field {field!r} must map module regexes to positive values, got {bad or patterns}"
            )
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        raise UserError(f"{path}: field 'modules_to_save' must be null or a list of module names, got {saved!r}")
    if not isinstance(config.get("use_dora", False), bool):
        raise UserError(f"{path}: field 'use_dora' must be true or false, got {config['use_dora']!r}")
    init = config.get("init_lora_weights", True)
    if mutates_base(init) and not residual_base:
        raise UserError(
            f"{path}: init_lora_weights is {init!r}: these factors apply to a residual base PEFT derives from "
            "the original at load time, not to the base itself; save the adapter with PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...), or export it with lora-ds export-adapter"
        )
    return config


def _check_module(tensors: dict, module: str, config: dict, source: str) -> None:
    A, B = tensors.get(module + LORA_A), tensors.get(module + LORA_B)
    if A is None or B is None:
        raise UserError(f"{source}: {module} has only one of lora_A / lora_B; the adapter is incomplete")
    r = module_rank(config, module)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        patterned = " (its rank_pattern)" if r != config["r"] else ""
        raise UserError(
            f"{source}: {module} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but "
            f"{CONFIG_FILE}{patterned} says r = {r}; the config belongs to another run"
        )
    m = magnitude(tensors, module)
    if bool(config.get("use_dora")) != (m is not None):
        have = "has a lora_magnitude_vector (DoRA)" if m is not None else "has no lora_magnitude_vector"
        raise UserError(
            f"{source}: {module} {have}, but {CONFIG_FILE} says use_dora = {bool(config.get('use_dora'))}; "
            "the config belongs to another run"
        )
    if m is not None and list(m.shape) != [B.shape[0]]:
        raise UserError(
            f"{source}: {module} has lora_magnitude_vector {list(m.shape)}, but lora_B has {B.shape[0]} output "
            "features; the adapter is corrupt"
        )
    if not (torch.isfinite(A).all() and torch.isfinite(B).all() and (m is None or torch.isfinite(m).all())):
        raise UserError(f"{source}: {module} holds NaN/Inf (the run diverged); use an earlier checkpoint")
    if not is_target(module, config["target_modules"]):
        raise UserError(
            f"{source}: module {module} is not selected by target_modules "
            f"{config['target_modules']!r} of {CONFIG_FILE}; the config belongs to another run"
        )


def check_lora(tensors: dict, config: dict, source: str, adapted: list[str] | None = None) -> list[str]:
    """Check that `tensors` are complete, finite LoRA factors of the rank and target modules that `config`
    (checked by `check_config`) says, and of the modules `adapted` lists (a run config's). Returns the modules.
    Errors begin with `source`, the file or flag the tensors came from."""
    _check_saved(tensors, config, source)
    modules = adapted_modules(tensors)
    if not modules:
        raise UserError(f"{source}: holds no LoRA tensors")
    for module in modules:
        _check_module(tensors, module, config, source)
    if adapted is not None and sorted(adapted) != modules:
        lost = sorted(set(adapted) - set(modules))
        raise UserError(
            f"{source}: {RUN_CONFIG} lists {len(adapted)} adapted modules but the checkpoint holds "
            f"LoRA for {len(modules)} (not found: {', '.join(lost[:3]) or 'none'}); the files belong to "
            "different runs"
        )
    return modules


def _check_saved(tensors: dict, config: dict, source: str) -> None:
    """The tensors that are not LoRA's must be finite params of modules `modules_to_save` selects (or, with
    ensure_weight_tying, copies of one under a tied module's name), and each entry of it must have some."""
    from lora_ds.saved_modules import is_saved

    entries = config.get("modules_to_save") or []
    saved = saved_tensors(tensors)
    stray = sorted(n for n in saved if not is_saved(n.rpartition(".")[0], entries))
    if config.get("ensure_weight_tying"):  # the other name of a tied matrix holds the same values (with_tied)
        selected = [t for n, t in saved.items() if n not in stray]
        stray = [n for n in stray if not any(torch.equal(saved[n], t) for t in selected)]
    if stray:
        raise UserError(
            f"{source}: holds {stray[0]}, which is no LoRA tensor and no param of a module that {CONFIG_FILE}'s "
            f"modules_to_save ({entries or 'none'}) selects; the config belongs to another run"
        )
    lacking = [e for e in entries if not any(n.rpartition(".")[0].endswith(e) for n in saved)]
    if lacking:
        raise UserError(
            f"{source}: {CONFIG_FILE} lists {lacking[0]!r} in modules_to_save, but no tensor of such a module is "
            "here; the adapter is incomplete"
        )
    bad = next((n for n, t in saved.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise UserError(f"{source}: {bad} holds NaN/Inf (the run diverged); use an earlier checkpoint")


def read_run_config(directory: str) -> dict | None:
    """The run_config.json of an adapter or checkpoint dir; None when it has none."""
    path = os.path.join(directory, RUN_CONFIG)
    return read_json(path) if os.path.isfile(path) else None


def with_tied(tensors: dict, tied: dict | None) -> dict:
    """`tensors` with a trained matrix that tied embeddings share also under its other name (`tied`: {other: name}),
    as PEFT saves it with ensure_weight_tying."""
    return tensors | {other: tensors[name].clone() for other, name in (tied or {}).items()}


def write_adapter(out_dir: str, tensors: dict, config: dict, dtype: str = "fp32", extra_json: dict | None = None):
    """Write `tensors` ({"<module>.lora_A.weight": T, ...}) and `config` to `out_dir`, atomically."""
    from safetensors.torch import save_file

    check_lora(tensors, check_config(config, out_dir), out_dir)
    cast = torch_dtype(dtype)
    state = {PEFT_PREFIX + k: v.detach().to(cast).contiguous().cpu() for k, v in sorted(tensors.items())}
    with atomic_dir(out_dir) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(os.path.join(tmp, CONFIG_FILE), config)
        for name, obj in (extra_json or {}).items():  # JSON objects, or text (a tokenizer's files)
            (write_text if isinstance(obj, str) else write_json)(os.path.join(tmp, name), obj)


def read_adapter(adapter_dir: str) -> tuple[dict, dict]:
    """(config, {"<module>.lora_A.weight": T, ...}) of a PEFT LoRA adapter directory, checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hint = f"--adapter must be a PEFT adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE})"
    cfg_path, weights_path = os.path.join(adapter_dir, CONFIG_FILE), os.path.join(adapter_dir, WEIGHTS_FILE)
    config = check_config(read_json(cfg_path, hint), cfg_path)
    if not os.path.isfile(weights_path):
        raise UserError(f"{weights_path}: missing; {hint}")
    try:
        raw = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_path}: unreadable safetensors file ({e}); re-export the adapter") from e
    tensors = {}
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        # PEFT may keep the adapter name in keys (".lora_A.default.weight"); files it saves drop it.
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        name = name.replace(".modules_to_save.default.", ".")  # a live PEFT state dict's saved module
        # A DoRA magnitude from a live PEFT state dict ends ".lora_magnitude_vector.default.weight".
        for alias in (MAGNITUDE + ".default.weight", MAGNITUDE + ".weight"):
            if name.endswith(alias):
                name = name[: -len(alias)] + MAGNITUDE
        tensors[name] = value
    check_lora(tensors, config, f"--adapter {adapter_dir}")
    return config, tensors
