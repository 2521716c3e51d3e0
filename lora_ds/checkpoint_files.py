"""The on-disk layout of OUTPUT/checkpoints: tags, `latest`, and the ZeRO-3 partition files in a tag.

`checkpoint.py` (save, resume) and `consolidate.py` (export) both read checkpoints through this module.

    OUTPUT/checkpoints/latest         the newest complete tag, replaced atomically once that tag is sealed
    OUTPUT/checkpoints/step_<8 digits>/
        zero_pp_rank_<r>_mp_rank_00_model_states.pt   param_shapes: one {name: shape} per param group, in the
                                                      order the flat partitions hold them; frozen_param_shapes /
                                                      frozen_param_fragments too when frozen params were saved
        [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                                      optimizer_state_dict.fp32_flat_groups[g]: rank r's fp32
                                                      master partition of group g (plus Adam moments)
        rng_rank<r>.safetensors                       rank r's RNG state (dropout)
        lora_init.safetensors                         PiSSA/OLoRA only: the initial factors A0, B0 (fp32, LoRA
                                                      names), which make the residual base W0 - s·B0·A0 the run
                                                      trained on: export converts the adapter to the original
                                                      base with them, which needs neither the base nor a GPU
        adapter_config.json, run_config.json          what the adapter is and how it was trained
        trainer_state.json                            step, samples, world size; written last: a tag without
                                                      it is incomplete

For W ranks (as DeepSpeed writes it and deepspeed/utils/zero_to_fp32.py reads it), rank r's flat group holds,
for each param p of the group in order, ceil(n_p / W) elements: elements r·ceil(n_p / W) onwards of p
flattened, zero-padded at the end of p only. So p is the concatenation over ranks of
flat_r[off_p : off_p + ceil(n_p / W)], cut to n_p elements.

Only rank 0's model-state file and the optimizer files are opened, each with mmap and unpickled with an
allowlist of DeepSpeed's types (`load_pt`): only the pages of the LoRA partitions are read, so frozen fragments
and optimizer moments stay on disk however large they are.
"""

from __future__ import annotations

import math
import os
import pickle
import re

import torch

from lora_ds.errors import UserError
from lora_ds.fsutil import read_json

LATEST = "latest"
STATE_FILE = "trainer_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
MODEL_STATES = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
# DeepSpeed prefixes the optimizer files with "bf16_" when bf16 is enabled.
OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")
LORA_INIT = "lora_init.safetensors"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_rank{rank:05d}.safetensors")


def tags(root: str) -> list[str]:
    """The step tags in `root`, oldest first, complete or not; [] when `root` does not exist."""
    return sorted(t for t in os.listdir(root) if TAG_RE.match(t)) if os.path.isdir(root) else []


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, STATE_FILE))


def check_complete(tag_dir: str, what: str, hint: str) -> None:
    """Raise, naming `what` (the flag or file that chose `tag_dir`) and `hint`, unless `tag_dir` is complete."""
    if not os.path.isdir(tag_dir):
        here = tags(os.path.dirname(tag_dir))
        reason = f"{tag_dir} does not exist (tags here: {', '.join(here) or 'none'})"
    elif not is_complete(tag_dir):
        reason = f"{tag_dir} is an incomplete checkpoint (no {STATE_FILE}; a rank died while saving)"
    else:
        return
    raise UserError(f"{what}: {reason}; {hint}")


def latest_tag(root: str, hint: str) -> str | None:
    """The tag `root/latest` names, checked complete (else an error ending in `hint`); None without the file."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    check_complete(os.path.join(root, tag), f"{path} names {tag!r}, which is missing or incomplete", hint)
    return tag


def read_state(tag_dir: str) -> dict:
    return read_json(os.path.join(tag_dir, STATE_FILE))


def deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoint files hold: all that unpickling may build."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def load_pt(path: str, map_location="cpu", mmap: bool = False):
    """Read a DeepSpeed `.pt` file with `weights_only=True` and the allowlist above: no code runs."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise UserError(
            f"{path}: refused to unpickle: it holds objects outside the allowlist of DeepSpeed "
            f"checkpoint types ({reason}); this is not a checkpoint lora-ds wrote"
        ) from e


def read_model_states(tag_dir: str) -> dict:
    """Rank 0's model-state file (mmapped): param shapes, scheduler, step counters."""
    path = os.path.join(tag_dir, MODEL_STATES.format(0))
    if not os.path.isfile(path):
        raise UserError(f"{tag_dir}: {MODEL_STATES.format(0)} is missing; not a complete ZeRO-3 checkpoint")
    return load_pt(path, mmap=True)


def _optim_files(tag_dir: str) -> dict[int, str]:
    """{rank: path} of the optimizer files of model-parallel rank 0."""
    found = {}
    for name in os.listdir(tag_dir):
        m = OPTIM_RE.match(name)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise UserError(
                f"{tag_dir}: {name} belongs to model-parallel rank {int(m.group(2))}; only "
                "data-parallel ZeRO-3 checkpoints (mp_rank_00) can be read"
            )
        rank = int(m.group(1))
        if rank in found:
            raise UserError(
                f"{tag_dir}: two optimizer files for rank {rank} ({os.path.basename(found[rank])}, "
                f"{name}); files of two runs are mixed"
            )
        found[rank] = os.path.join(tag_dir, name)
    if 0 not in found:
        raise UserError(
            f"{tag_dir}: no optimizer file of rank 0 ([bf16_]{OPTIM_FILE.format(0)}); not a ZeRO-3 "
            "checkpoint with optimizer state"
        )
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


def _world(tag_dir: str, model_state: dict, files: dict, first: dict) -> int:
    """The number of ranks that wrote the tag, checked against the optimizer files present."""
    if int(first.get("zero_stage", -1)) != 3:
        raise UserError(f"{files[0]}: ZeRO stage {int(first.get('zero_stage', -1))}, expected 3")
    world = first["partition_count"]
    if sorted(files) != list(range(world)) or model_state.get("dp_world_size") != world:
        missing = [f"rank {r}" for r in range(world) if r not in files]
        raise UserError(
            f"{tag_dir}: written by {world} ranks (dp_world_size {model_state.get('dp_world_size')}), "
            f"but holds optimizer files of ranks {sorted(files)} (missing: {', '.join(missing) or 'none'})"
            "; a rank's files were lost or mixed in from another run"
        )
    return world


def _rank_partitions(path: str, state: dict, layout: list, world: int, moments: bool) -> list[dict]:
    """Per group, {"fp32"[, moments]: flat tensor} of one rank's optimizer file, checked against `layout`."""
    groups = state.get("fp32_flat_groups")
    if state.get("partition_count") != world or not isinstance(groups, list) or len(groups) != len(layout):
        raise UserError(
            f"{path}: partition_count {state.get('partition_count')} / "
            f"{len(groups) if isinstance(groups, list) else 'no'} fp32 groups, expected {world} / "
            f"{len(layout)}; the files come from different runs"
        )
    per_group = []
    for g, (group, entries) in enumerate(zip(groups, layout)):
        buffers = {"fp32": group}
        if moments:
            adam = state.get("optimizer_state_dict", {}).get("state", {}).get(g, {})
            buffers.update({key: adam.get(key) for key in MOMENTS})
        expected = sum(part for *_, part in entries)
        for key, buffer in buffers.items():
            if (
                not isinstance(buffer, torch.Tensor)
                or buffer.dtype != torch.float32
                or buffer.dim() != 1
                or buffer.numel() != expected
            ):
                found = f"{buffer.numel()} {buffer.dtype}" if isinstance(buffer, torch.Tensor) else "no"
                raise UserError(
                    f"{path}: {key} of group {g} has {found} elements, but its params need "
                    f"{expected} fp32 per rank; the shapes do not match this checkpoint"
                )
        per_group.append(buffers)
    return per_group


def read_zero3_state(tag_dir: str, moments: bool = False) -> tuple[dict, int, torch.Tensor | None]:
    """({name: {"fp32": tensor[, "exp_avg", "exp_avg_sq"]}} of every param the optimizer owns, world size,
    Adam step) from a ZeRO-3 tag dir. The moments are read only when asked for (elastic resume)."""
    model_state = read_model_states(tag_dir)
    param_shapes = model_state.get("param_shapes")
    if not isinstance(param_shapes, list) or not param_shapes:
        raise UserError(
            f"{os.path.join(tag_dir, MODEL_STATES.format(0))}: no param_shapes; the checkpoint was "
            "not saved by a ZeRO engine"
        )
    files = _optim_files(tag_dir)
    first = _optim_state(files[0])
    world = _world(tag_dir, model_state, files, first)
    layout = _group_layout(param_shapes, world)
    flat = [
        _rank_partitions(files[r], first if r == 0 else _optim_state(files[r]), layout, world, moments)
        for r in range(world)
    ]  # flat[r][g][key]: rank r's partition of group g (mmapped)
    keys = ("fp32", *MOMENTS) if moments else ("fp32",)
    params = {}
    for g, entries in enumerate(layout):
        for name, shape, offset, part in entries:
            params[name] = {
                key: torch.cat([flat[rank][g][key][offset : offset + part] for rank in range(world)])[: shape.numel()]
                .view(shape)
                .clone()
                for key in keys
            }
    step = first.get("optimizer_state_dict", {}).get("state", {}).get(0, {}).get("step") if moments else None
    return params, world, step


def read_lora_init(tag_dir: str) -> dict:
    """{"<module>.lora_A.weight": A0, ...} of a PiSSA/OLoRA tag (`LORA_INIT`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(tag_dir, LORA_INIT)
    if not os.path.isfile(path):
        raise UserError(
            f"{tag_dir}: its adapter config says the run started from a residual base (PiSSA/OLoRA), but {LORA_INIT}, "
            "the initial factors that convert the adapter to the original base, is missing"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable safetensors file ({e})") from e


def read_zero3_params(tag_dir: str) -> tuple[dict, int]:
    """({name: fp32 tensor} of every param the optimizer owns, world size), from a ZeRO-3 tag dir."""
    params, world, _ = read_zero3_state(tag_dir)
    return {name: t["fp32"] for name, t in params.items()}, world
