"""LoRA tensors out of a ZeRO-3 checkpoint, on a CPU: no process group, no base model, any world size.

The layout, as DeepSpeed writes it (and deepspeed/utils/zero_to_fp32.py reads it), for W ranks:

    zero_pp_rank_<r>_mp_rank_00_model_states.pt   param_shapes: one {name: shape} per param group, in the
                                                  order the flat partitions hold them; frozen_param_shapes /
                                                  frozen_param_fragments too when frozen params were saved
    [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                                  optimizer_state_dict.fp32_flat_groups[g]: rank r's fp32
                                                  master partition of group g (plus Adam moments)

Rank r's flat group holds, for each param p of the group in order, ceil(n_p / W) elements: elements
r·ceil(n_p / W) onwards of p flattened, zero-padded at the end of p only. So p is the concatenation over ranks
of flat_r[off_p : off_p + ceil(n_p / W)], cut to n_p elements.

Only rank 0's model-state file and the optimizer files are opened, each with mmap and unpickled with the
checkpoint allowlist (`lora_ds.checkpoint.load_pt`): only the pages of the LoRA partitions are read, so
frozen fragments and optimizer moments stay on disk however large they are.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

from lora_ds.adapter import CONFIG_FILE, write_adapter
from lora_ds.checkpoint import LATEST, STATE_FILE, is_complete, load_pt
from lora_ds.errors import UserError

MODEL_STATES = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
# DeepSpeed prefixes the optimizer files with "bf16_" when bf16 is enabled.
OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
RUN_CONFIG = "run_config.json"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def resolve_tag_dir(checkpoint: str, tag: str | None = None) -> str:
    """The tag dir to export: `checkpoint/tag`, `checkpoint/<latest>`, or `checkpoint` if it is a tag dir."""
    if not os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: no such directory; give OUTPUT/checkpoints of a run")
    if tag is None and os.path.isfile(os.path.join(checkpoint, MODEL_STATES.format(0))):
        tag_dir = checkpoint
    else:
        tags = sorted(t for t in os.listdir(checkpoint) if os.path.isdir(os.path.join(checkpoint, t)))
        if tag is None:
            latest = os.path.join(checkpoint, LATEST)
            if not os.path.isfile(latest):
                raise UserError(f"--checkpoint {checkpoint}: no '{LATEST}' file; pass --tag (tags here: "
                                f"{', '.join(tags) or 'none'})")
            with open(latest) as f:
                tag = f.read().strip()
        tag_dir = os.path.join(checkpoint, tag)
        if not os.path.isdir(tag_dir):
            raise UserError(f"--tag {tag}: {tag_dir} does not exist (tags here: {', '.join(tags) or 'none'})")
    if not is_complete(tag_dir):
        raise UserError(f"{tag_dir}: incomplete checkpoint (no {STATE_FILE}; a rank died while saving); "
                        f"export an earlier tag with --tag")
    return tag_dir


def _optim_files(tag_dir: str) -> dict[int, str]:
    """{rank: path} of the optimizer files of model-parallel rank 0."""
    found = {}
    for name in os.listdir(tag_dir):
        m = OPTIM_RE.match(name)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise UserError(f"{tag_dir}: {name} belongs to model-parallel rank {int(m.group(2))}; only "
                            "data-parallel ZeRO-3 checkpoints (mp_rank_00) can be exported")
        rank = int(m.group(1))
        if rank in found:
            raise UserError(f"{tag_dir}: two optimizer files for rank {rank} ({os.path.basename(found[rank])}, "
                            f"{name}); files of two runs are mixed")
        found[rank] = os.path.join(tag_dir, name)
    if 0 not in found:
        raise UserError(f"{tag_dir}: no optimizer file of rank 0 ([bf16_]{OPTIM_FILE.format(0)}); not a ZeRO-3 "
                        "checkpoint with optimizer state")
    return found


def _optim_state(path: str) -> dict:
    state = load_pt(path, mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("optimizer_state_dict"), dict):
        raise UserError(f"{path}: no optimizer_state_dict; not a DeepSpeed ZeRO optimizer file")
    return state["optimizer_state_dict"]


def _group_layout(param_shapes: list, world: int) -> list[list]:
    """Per group: [(name, shape, offset, partition numel)] in flat order."""
    layout = []
    for group in param_shapes:
        offset, entries = 0, []
        for name, shape in group.items():
            part = math.ceil(math.prod(shape) / world)
            entries.append((name, torch.Size(shape), offset, part))
            offset += part
        layout.append(entries)
    return layout


MOMENTS = ("exp_avg", "exp_avg_sq")


def read_zero3_state(tag_dir: str, moments: bool = False) -> tuple[dict, int, torch.Tensor | None]:
    """({name: {"fp32": tensor[, "exp_avg", "exp_avg_sq"]}} of every param the optimizer owns, world size,
    Adam step) from a ZeRO-3 tag dir. The moments are read only when asked for (elastic resume)."""
    model_file = os.path.join(tag_dir, MODEL_STATES.format(0))
    if not os.path.isfile(model_file):
        raise UserError(f"{tag_dir}: {MODEL_STATES.format(0)} is missing; not a complete ZeRO-3 checkpoint")
    model_state = load_pt(model_file, mmap=True)
    param_shapes = model_state.get("param_shapes")
    if not isinstance(param_shapes, list) or not param_shapes:
        raise UserError(f"{model_file}: no param_shapes; the checkpoint was not saved by a ZeRO engine")

    files = _optim_files(tag_dir)
    first = _optim_state(files[0])
    if int(first.get("zero_stage", -1)) != 3:
        raise UserError(f"{files[0]}: ZeRO stage {int(first.get('zero_stage', -1))}, expected 3")
    world = first["partition_count"]
    if sorted(files) != list(range(world)) or model_state.get("dp_world_size") != world:
        missing = [f"rank {r}" for r in range(world) if r not in files]
        raise UserError(f"{tag_dir}: written by {world} ranks (dp_world_size {model_state.get('dp_world_size')}), "
                        f"but holds optimizer files of ranks {sorted(files)} (missing: {', '.join(missing) or 'none'})"
                        "; a rank's files were lost or mixed in from another run")

    layout = _group_layout(param_shapes, world)
    keys = ("fp32", *MOMENTS) if moments else ("fp32",)
    flat = []  # flat[r][g][key]: rank r's partition of group g (mmapped)
    for rank in range(world):
        path = files[rank]
        state = first if rank == 0 else _optim_state(path)
        groups = state.get("fp32_flat_groups")
        if state.get("partition_count") != world or not isinstance(groups, list) or len(groups) != len(layout):
            raise UserError(f"{path}: partition_count {state.get('partition_count')} / "
                            f"{len(groups) if isinstance(groups, list) else 'no'} fp32 groups, expected {world} / "
                            f"{len(layout)}; the files come from different runs")
        per_group = []
        for g, (group, entries) in enumerate(zip(groups, layout)):
            buffers = {"fp32": group}
            if moments:
                adam = state.get("optimizer_state_dict", {}).get("state", {}).get(g, {})
                buffers.update({key: adam.get(key) for key in MOMENTS})
            expected = sum(part for *_, part in entries)
            for key, buffer in buffers.items():
                if (not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.float32 or buffer.dim() != 1
                        or buffer.numel() != expected):
                    found = f"{buffer.numel()} {buffer.dtype}" if isinstance(buffer, torch.Tensor) else "no"
                    raise UserError(f"{path}: {key} of group {g} has {found} elements, but its params need "
                                    f"{expected} fp32 per rank; the shapes do not match this checkpoint")
            per_group.append(buffers)
        flat.append(per_group)

    params = {}
    for g, entries in enumerate(layout):
        for name, shape, offset, part in entries:
            params[name] = {key: torch.cat([flat[rank][g][key][offset:offset + part] for rank in range(world)])
                            [:shape.numel()].view(shape).clone() for key in keys}
    step = first.get("optimizer_state_dict", {}).get("state", {}).get(0, {}).get("step") if moments else None
    return params, world, step


def read_zero3_params(tag_dir: str) -> tuple[dict, int]:
    """({name: fp32 tensor} of every param the optimizer owns, world size), from a ZeRO-3 tag dir."""
    params, world, _ = read_zero3_state(tag_dir)
    return {name: t["fp32"] for name, t in params.items()}, world


def _matches_target(module: str, targets) -> bool:
    """PEFT's rule: a list matches by name or '.name' suffix, a string is a full-match regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def check_lora(tensors: dict, config: dict, source: str, adapted_modules=None) -> list[str]:
    """Check that `tensors` are complete, well-shaped LoRA factors for `config`. Returns the module names."""
    other = sorted(n for n in tensors if not n.endswith(LORA_SUFFIXES))
    if other:
        raise UserError(f"{source}: the optimizer also trains non-LoRA params (e.g. {other[0]}), which a LoRA "
                        "adapter cannot carry")
    modules = sorted({n[:-len(".lora_A.weight")] for n in tensors})
    if not modules:
        raise UserError(f"{source}: no LoRA params in the checkpoint")
    r = config["r"]
    for module in modules:
        A, B = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if A is None or B is None:
            raise UserError(f"{source}: {module} has only one of lora_A / lora_B; the checkpoint is incomplete")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise UserError(f"{source}: {module} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but "
                            f"{CONFIG_FILE} says r = {r}; the config belongs to another run")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise UserError(f"{source}: {module} holds NaN/Inf (the run diverged); export an earlier tag")
        if not _matches_target(module, config["target_modules"]):
            raise UserError(f"{source}: module {module} is not selected by target_modules "
                            f"{config['target_modules']!r} of {CONFIG_FILE}; the config belongs to another run")
    if adapted_modules is not None and sorted(adapted_modules) != modules:
        lost = sorted(set(adapted_modules) - set(modules))
        raise UserError(f"{source}: {RUN_CONFIG} lists {len(adapted_modules)} adapted modules but the checkpoint "
                        f"holds LoRA for {len(modules)} (not found: {', '.join(lost[:3]) or 'none'}); the files "
                        "belong to different runs")
    return modules


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise UserError(f"{path}: missing; {what}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def export_adapter(checkpoint: str, out_dir: str, tag: str | None = None, dtype: str = "fp32") -> dict:
    """Write the PEFT adapter of a ZeRO-3 checkpoint to `out_dir`. Returns a report."""
    tag_dir = resolve_tag_dir(checkpoint, tag)
    config = _read_json(os.path.join(tag_dir, CONFIG_FILE),
                        "the trainer writes the adapter config into every checkpoint tag")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise UserError(f"{os.path.join(tag_dir, CONFIG_FILE)}: field {field!r} is missing")
    run_path = os.path.join(tag_dir, RUN_CONFIG)
    run_config = _read_json(run_path, "") if os.path.isfile(run_path) else None
    adapted = (run_config or {}).get("resolved", {}).get("adapted_modules")
    params, world = read_zero3_params(tag_dir)
    modules = check_lora(params, config, tag_dir, adapted)
    write_adapter(out_dir, params, config, dtype, extra_json={RUN_CONFIG: run_config} if run_config else None)
    return {"checkpoint": os.path.abspath(tag_dir), "world_size": world, "modules": len(modules),
            "params": sum(t.numel() for t in params.values()), "out": os.path.abspath(out_dir), "dtype": dtype}
