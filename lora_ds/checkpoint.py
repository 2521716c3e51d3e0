"""Checkpoints: OUTPUT/checkpoints/<tag>/ holds the LoRA params and their optimizer state, never the base.

Every rank writes its files into the tag, then rank 0 seals it (trainer_state.json, written last) and points
`latest` at it; `lora_ds.checkpoint_files` describes the files. Data position needs no file: the sampler is a
function of the step (lora_ds/data.py).

Elastic resume: a tag written by N ranks resumes on M != N ranks by consolidating the LoRA params and
their Adam moments (small) and re-partitioning them for M ranks. What changes: the dropout RNG streams
start fresh, and each step's rows are dealt out as micro × accum × M; keep micro × accum × ranks equal
(e.g. double --grad_accum when halving the ranks) and every step still reads the same rows.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import torch

from lora_ds.checkpoint_files import (
    LATEST,
    STATE_FILE,
    check_complete,
    is_complete,
    latest_tag,
    load_pt,
    read_model_states,
    read_state,
    read_zero3_state,
    rng_file,
    tag_for,
    tags,
)
from lora_ds.errors import UserError
from lora_ds.fsutil import write_json, write_text


def install_safe_loading(engine) -> None:
    """Make `engine.load_checkpoint` read every file through `load_pt` instead of a full unpickle."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_pt(path, map_location=map_location or "cpu")

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = SafeTorchCheckpointEngine(config_params=engine._config)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(
    engine, root: str, step: int, trainer_state: dict, extra_json: dict, keep: int, extra_tensors: dict | None = None
) -> str:
    """Save a checkpoint of `engine` at `step` (collective: every rank calls it). Returns the tag.
    Rank 0 writes `extra_json` ({file: object}) and `extra_tensors` ({file: {name: tensor}}, safetensors) into it."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = os.path.join(root, tag)
    if rank == 0 and os.path.isdir(tag_dir):
        _remove_tag(tag_dir)  # the leftover of a run that died after its last complete checkpoint
    dist.barrier()
    engine.save_checkpoint(root, tag, exclude_frozen_parameters=True, save_latest=False)
    save_file(_rng_state(), rng_file(tag_dir, rank))
    dist.barrier()
    if rank == 0:
        for name, obj in extra_json.items():  # JSON objects, or text (a tokenizer's files)
            (write_text if isinstance(obj, str) else write_json)(os.path.join(tag_dir, name), obj)
        for name, tensors in (extra_tensors or {}).items():
            save_file(tensors, os.path.join(tag_dir, name))
        write_json(os.path.join(tag_dir, STATE_FILE), trainer_state)
        write_text(os.path.join(root, LATEST), tag + "\n")
        _prune(root, keep)
    dist.barrier()
    return tag


def _prune(root: str, keep: int) -> None:
    """Keep the newest `keep` complete tags; remove older ones and the leftovers of saves that died
    (unsealed tags, a `latest` never renamed into place).

    Runs on rank 0 after every rank has finished this save, so nothing here is being written.
    """
    found = tags(root)
    complete = [t for t in found if is_complete(os.path.join(root, t))]
    for old in set(found) - set(complete[-keep:]):
        _remove_tag(os.path.join(root, old))
    for name in os.listdir(root):
        if name.startswith(f"{LATEST}.tmp-"):
            os.remove(os.path.join(root, name))


def _remove_tag(tag_dir: str) -> None:
    """Unseal first, so a removal cut short never leaves a dir that looks complete."""
    state = os.path.join(tag_dir, STATE_FILE)
    if os.path.isfile(state):
        os.remove(state)
    shutil.rmtree(tag_dir, ignore_errors=True)


def resolve_tag(root: str, requested: str) -> str | None:
    """The tag to resume from: `requested`, or what `latest` names for 'auto'; None if there is none."""
    if requested == "never":
        return None
    if requested != "auto":
        check_complete(os.path.join(root, requested), f"--resume {requested}", "pass a complete tag, auto, or never")
        return requested
    tag = latest_tag(root, "point it at a complete tag or pass --resume never")
    found = tags(root)
    if tag is None:
        complete = [t for t in found if is_complete(os.path.join(root, t))]
        if complete:
            # Starting over would overwrite these tags as it reaches their steps.
            raise UserError(
                f"{root}: complete checkpoints ({', '.join(complete)}) but no '{LATEST}' file; pass "
                f"--resume {complete[-1]} to continue from the newest, or --resume never to start over "
                "(which replaces them)"
            )
        if found:
            warnings.warn(
                f"{root}: unfinished checkpoint dirs {found} (the first save died) and no '{LATEST}'; starting fresh",
                stacklevel=2,
            )
        return None
    ignored = [t for t in found if t > tag]
    if ignored:
        warnings.warn(
            f"{root}: ignoring {', '.join(ignored)}, newer than 'latest' ({tag}): a save that a dying "
            f"rank left unfinished; resuming from {tag}, the run writes these steps again",
            stacklevel=2,
        )
    return tag


# What a tag's tensors and optimizer groups are shaped by: a resume with other values would fail inside DeepSpeed
# (ranks) or silently keep the checkpoint's param groups and their lrs (LoRA+).
# A resume must train what the checkpoint trained: the same factor shapes, optimizer groups and frozen base.
# PiSSA/OLoRA: the residual base is recomputed from the original base by the init the tag was trained with.
FIXED_ON_RESUME = (
    ("lora", "r"),
    ("lora", "rank_pattern"),
    ("lora", "init_lora_weights"),
    ("train", "loraplus_lr_ratio"),
    ("lora", "modules_to_save"),
    ("model", "add_tokens"),
    ("model", "quantize"),
)
# OLoRA's residual W0 - s·B0·A0 also depends on each module's scale s.
FIXED_WITH_RESIDUAL_BASE = (("lora", "alpha"), ("lora", "alpha_pattern"), ("lora", "rslora"))


def check_resumable(tag_dir: str, run: dict, defaults: dict) -> None:
    """Refuse to resume `tag_dir` under `run` (a RunConfig's dict) when a FIXED_ON_RESUME setting (and for a
    PiSSA/OLoRA tag, a FIXED_WITH_RESIDUAL_BASE one) differs from the tag's run_config.json (a key it lacks has its
    value of `defaults`, an older version's)."""
    from lora_ds.config import SECTION_TYPES
    from lora_ds.fsutil import read_json
    from lora_ds.lora import mutates_base

    path = os.path.join(tag_dir, "run_config.json")
    if not os.path.isfile(path):
        return
    saved = read_json(path)
    residual = mutates_base(saved.get("lora", {}).get("init_lora_weights"))
    for section, key in FIXED_ON_RESUME + (FIXED_WITH_RESIDUAL_BASE if residual else ()):
        then = saved.get(section, {}).get(key, defaults[section][key])
        if then != run[section][key]:
            flag = next(f.metadata["flag"] for f in dataclasses.fields(SECTION_TYPES[section]) if f.name == key)
            raise UserError(
                f"--resume: {tag_dir} was trained with {flag} {then!r}, this run gives {run[section][key]!r}; "
                "pass the same value to resume, or --resume never (or another --output_dir) to start over"
            )


def _load_resharded(engine, root: str, tag: str) -> None:
    """Load a ZeRO-3 tag written by another number of ranks into this engine's partitions."""
    import torch.distributed as dist

    tag_dir = os.path.join(root, tag)
    if not engine.zero_optimization_partition_weights():
        raise UserError(
            f"{tag_dir}: written by another number of ranks; only ZeRO-3 checkpoints resume "
            "elastically: resume with the same number of ranks"
        )
    tensors, _, step = read_zero3_state(tag_dir, moments=True)
    rank = dist.get_rank()
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    state = {}
    for g, params in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[g]
        moments = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        offset = 0
        for p in params:
            saved = tensors.get(names[id(p)])
            if saved is None:
                raise UserError(
                    f"{tag_dir}: no saved state for {names[id(p)]}; the checkpoint is of another "
                    "LoRA configuration (check --lora_targets and the model)"
                )
            size = p.ds_tensor.numel()
            for key, dest in (
                ("fp32", flat.data),
                ("exp_avg", moments["exp_avg"]),
                ("exp_avg_sq", moments["exp_avg_sq"]),
            ):
                part = saved[key].reshape(-1)[rank * size : (rank + 1) * size]
                dest[offset : offset + size].zero_()
                dest[offset : offset + part.numel()].copy_(part)
            p.ds_tensor.data.copy_(flat.data[offset : offset + size])
            offset += size
        state[g] = {"step": step.clone(), **moments}
    # Between steps DeepSpeed detaches the fp32 flats from the inner optimizer's groups; attach them so the
    # state maps onto them, as DeepSpeed's own loader does.
    opt._set_fp32_optimizer_param_groups()
    opt.optimizer.load_state_dict({"state": state, "param_groups": opt.optimizer.state_dict()["param_groups"]})
    opt._clear_fp32_optimizer_param_groups()
    model_state = read_model_states(tag_dir)
    engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
    for group, lr in zip(opt.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = model_state["global_steps"]
    engine.global_samples = model_state["global_samples"]
    engine.skipped_steps = model_state["skipped_steps"]


def load(engine, root: str, tag: str) -> dict:
    """Restore model (LoRA), optimizer, scheduler and this rank's RNG from `tag`. Returns its trainer state."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    state = read_state(os.path.join(root, tag))
    install_safe_loading(engine)
    if state["world_size"] != dist.get_world_size():
        _load_resharded(engine, root, tag)
    else:
        load_path, _ = engine.load_checkpoint(
            root, tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise UserError(f"{os.path.join(root, tag)}: DeepSpeed could not load this checkpoint")
    rank = dist.get_rank()
    rng_path = rng_file(os.path.join(root, tag), rank)
    if state["world_size"] == dist.get_world_size() and os.path.isfile(rng_path):
        rng = load_file(rng_path)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif rank == 0:
        warnings.warn(
            f"{tag}: written by {state['world_size']} ranks, resumed on {dist.get_world_size()}; "
            "dropout RNG streams start fresh",
            stacklevel=2,
        )
    return state
