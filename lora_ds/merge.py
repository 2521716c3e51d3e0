"""Merging LoRA into the base weights: W = W0 + s·B·A (DoRA: m / ||W0 + s·B·A||_row · (W0 + s·B·A)), computed in
fp32 and cast once.

    merge_model_dir(base, adapter, out)   HF model dir + PEFT adapter -> plain HF model dir
    merge_live(layer)                     one LoRA layer of a live model (ZeRO-3 or not) merged in place
    merged_for_eval(model)                all of them, inside a block, restored bitwise on exit

Modules trained in full (the adapter's modules_to_save) replace the base's tensors, also with another number of
rows (a vocabulary grown by --add_tokens: config.json's vocab_size follows, and the adapter's tokenizer replaces
the base's).

The dir merge streams: each base shard is rewritten into an output shard of the same name, tensor by
tensor. Tensors that do not change are copied byte for byte between the files (in the kernel where it
can); the others are read, merged or cast, and written in blocks of rows of a few MiB. Peak memory is
therefore the adapter plus a few blocks, whatever the size of the model or of its tensors. Everything is
checked before the first byte is written, and built in a temporary dir that replaces `out` only when
complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass

import torch

from lora_ds.adapter import adapted_modules, factors, magnitude, read_adapter, saved_tensors, scaling
from lora_ds.dtypes import torch_dtype
from lora_ds.errors import UserError
from lora_ds.fsutil import atomic_dir, read_json, write_json, write_text
from lora_ds.hf_dir import FLOATS, INDEX_FILE, ModelDir, Shard, read_model_dir
from lora_ds.lora import dora_merged_weight, merged_weight

RECORD_FILE = "lora_merge.json"
_FLOAT_NAME = {v: k for k, v in FLOATS.items()}
# Weight formats never copied into the merged dir (the merged safetensors replace them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_CHUNK = 64 << 20
# Rows of a merged or cast tensor are processed in blocks of about this many fp32 bytes (cache-sized).
_BLOCK_BYTES = 4 << 20
# --verify tolerance on max |logit difference| / max(1, max |logit|), by the coarsest stored dtype. Storing
# merged weights in bf16 moves tiny random models' logits by ~3e-3 of their scale and 7B models' by ~1e-2;
# a wrong merge (transpose, scale, module) moves them by the adapter's own effect, typically far more.
VERIFY_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# ---------------------------------------------------------------- shard bytes


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Append `count` bytes at `offset` of src to dst: copy_file_range (no user-space copy), else pread."""
    kernel = hasattr(os, "copy_file_range")  # Linux only
    while count:
        if kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
            except OSError as e:  # e.g. EXDEV: no kernel copy between these two file systems
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel = False
                continue
        else:
            chunk = os.pread(src_fd, min(count, _CHUNK), offset)
            _write_all(dst_fd, chunk)
            n = len(chunk)
        if n == 0:
            raise UserError("a base shard ended early while copying; the shard is truncated")
        offset += n
        count -= n


def _tensor_bytes(t: torch.Tensor):
    return t.contiguous().view(-1).view(torch.uint8).numpy()


# ---------------------------------------------------------------- planning (all checks, nothing written)


@dataclass
class Plan:
    """What a merge will do: the base's shards, which base keys change and how, and the output dtype."""

    base: ModelDir
    targets: dict  # base key -> adapter module name
    config: dict
    tensors: dict
    dtype: torch.dtype | None
    replaced: dict  # base key -> the adapter's tensor of a module trained in full (modules_to_save)
    vocab_size: int | None  # the grown vocabulary's rows, when the adapter's embeddings have more than the base's

    def out_dtype(self, info: dict) -> str:
        """safetensors dtype name of a tensor in the output."""
        if self.dtype is not None and info["dtype"] in FLOATS:
            return _FLOAT_NAME[self.dtype]
        return info["dtype"]


def _check_base_weight(base: ModelDir, key: str, module: str, A, B, fan_in_fan_out: bool, adapter_dir: str) -> None:
    """The base weight `key` must have the shape of `module`'s ΔW and a floating dtype."""
    info = base.header(key)
    linear = [B.shape[0], A.shape[1]]
    expected = linear[::-1] if fan_in_fan_out else linear
    if info["shape"] != expected:
        hint = (
            (f" (it is laid out for fan_in_fan_out={not fan_in_fan_out}; the adapter config says {fan_in_fan_out})")
            if info["shape"] == expected[::-1]
            else ""
        )
        raise UserError(
            f"--adapter {adapter_dir}: {module} expects a base weight of shape {expected}, but "
            f"{key} in --base is {info['shape']}{hint}; the adapter was trained on another base"
        )
    if info["dtype"] not in FLOATS:
        raise UserError(
            f"--base {base.path}: {key} is {info['dtype']}, not a floating-point weight; "
            "quantized bases cannot be merged into"
        )


def plan_merge(base_dir: str, adapter_dir: str, dtype: str | None = None) -> Plan:
    """Read the adapter and the base's headers; check that the adapter belongs to this base."""
    cast = torch_dtype(dtype) if dtype is not None else None
    config, tensors = read_adapter(adapter_dir)
    base = read_model_dir(base_dir, "--base")
    modules = adapted_modules(tensors)
    keys = {m: base.weight_key(m) for m in modules}
    missing = [m for m in modules if keys[m] is None]
    if missing:
        raise UserError(
            f"--adapter {adapter_dir}: {len(missing)} of its {len(modules)} modules have no weight in "
            f"--base {base_dir} (e.g. {missing[0]}.weight); the adapter was trained on another base"
        )
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module in modules:
        _check_base_weight(base, keys[module], module, *factors(tensors, module), fan_in_fan_out, adapter_dir)
    replaced, vocab_size = _plan_saved(base, saved_tensors(tensors), adapter_dir)
    return Plan(base, {keys[m]: m for m in modules}, config, tensors, cast, replaced, vocab_size)


def _plan_saved(base: ModelDir, saved: dict, adapter_dir: str) -> tuple[dict, int | None]:
    """({base key: tensor} that the saved modules replace, the grown vocab size or None). A saved tensor has the
    base tensor's shape, or more rows of it (a grown vocabulary: the embedding and head, all of the same rows). The
    head of tied embeddings, which the base does not store, stays tied to the written embedding."""
    config = read_json(os.path.join(base.path, "config.json"))
    replaced, grown = {}, set()
    for name, tensor in sorted(saved.items()):
        key = base.stored_key(name)
        if key is None:
            if config.get("tie_word_embeddings") and name.endswith(".weight"):
                continue
            raise UserError(
                f"--adapter {adapter_dir}: it trained {name} in full, which --base {base.path} has no tensor of; "
                "the adapter was trained on another base"
            )
        shape, info = list(tensor.shape), base.header(key)
        if info["dtype"] not in FLOATS:
            raise UserError(f"--base {base.path}: {key} is {info['dtype']}, not a floating-point tensor")
        if shape != info["shape"]:
            if len(shape) != 2 or shape[1:] != info["shape"][1:] or shape[0] < info["shape"][0]:
                raise UserError(
                    f"--adapter {adapter_dir}: {name} is {shape}, but {key} in --base {base.path} is "
                    f"{info['shape']}; the adapter was trained on another base"
                )
            grown.add(shape[0])
        replaced[key] = tensor
    if len(grown) > 1:
        raise UserError(f"--adapter {adapter_dir}: its grown embeddings disagree on the vocabulary ({sorted(grown)})")
    return replaced, next(iter(grown), None)


# ---------------------------------------------------------------- writing


def _write_shard(plan: Plan, shard: Shard, dst: str) -> int:
    """Write the merged counterpart of `shard` to `dst`, one tensor at a time. Returns its data bytes."""
    fan_in_fan_out = bool(plan.config.get("fan_in_fan_out"))
    order = sorted(shard.tensors, key=lambda k: shard.tensors[k]["data_offsets"][0])
    header, offset = {}, 0
    for key in order:
        info = shard.tensors[key]
        name = plan.out_dtype(info)
        start, end = info["data_offsets"]
        shape = list(plan.replaced[key].shape) if key in plan.replaced else info["shape"]
        same = name == info["dtype"] and key not in plan.replaced
        nbytes = end - start if same else math.prod(shape) * FLOATS[name].itemsize
        header[key] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if shard.metadata is not None:
        header = {"__metadata__": shard.metadata, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # as safetensors itself pads: data starts 8-byte aligned

    src_fd = os.open(shard.path, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(dst_fd, struct.pack("<Q", len(blob)) + blob)
        for key in order:
            info, out_dtype = shard.tensors[key], header[key]["dtype"]
            start, end = info["data_offsets"]
            if key in plan.replaced:
                _write_all(dst_fd, _tensor_bytes(_finite_cast(plan.replaced[key], FLOATS[out_dtype], key)))
                continue
            if key not in plan.targets and out_dtype == info["dtype"]:
                _copy_range(src_fd, dst_fd, shard.data_start + start, end - start)
                continue
            module = plan.targets.get(key)
            scale = None if module is None else scaling(plan.config, module)
            norm = None
            if module is not None and fan_in_fan_out and magnitude(plan.tensors, module) is not None:
                norm = _column_norms(src_fd, shard.data_start + start, info, plan, module, scale)
            for rows, block in _row_blocks(src_fd, shard.data_start + start, info):
                if module is None:
                    block = block.to(FLOATS[out_dtype])
                else:
                    block = _merged_rows(
                        block,
                        rows,
                        plan,
                        module,
                        scale,
                        fan_in_fan_out,
                        FLOATS[out_dtype],
                        f"{shard.path}: {key}",
                        norm,
                    )
                _write_all(dst_fd, _tensor_bytes(block))
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    return offset


def _finite_cast(tensor: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """A saved module's tensor in the output dtype, checked finite after the cast."""
    out = tensor.to(dtype)
    if out.numel() and not torch.isfinite(out).all():
        raise UserError(f"the adapter's {key} is not finite in {dtype}; choose another --dtype; nothing was written")
    return out


def _row_blocks(fd: int, offset: int, info: dict):
    """(row slice, tensor) blocks of about _BLOCK_BYTES of the tensor stored at `offset`, read with pread: a
    merge or cast never holds a whole tensor, and what it reads is not left mapped."""
    dtype = FLOATS[info["dtype"]]
    shape = info["shape"] or [1]
    rows, row_numel = shape[0], math.prod(shape[1:])
    step = max(1, _BLOCK_BYTES // max(1, 4 * row_numel))  # sized by the fp32 working copy
    step = -(-rows // -(-rows // step)) if rows else 1  # equal blocks: no tail of a few rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = torch.empty((r1 - r0) * row_numel * dtype.itemsize, dtype=torch.uint8)
        view, at = memoryview(block.numpy()), offset + r0 * row_numel * dtype.itemsize
        while view:
            n = os.preadv(fd, [view], at)
            if n == 0:
                raise UserError("a base shard ended early while reading; the shard is truncated")
            view, at = view[n:], at + n
        yield slice(r0, r1), block.view(dtype).view(r1 - r0, *shape[1:])


def _column_norms(fd: int, offset: int, info: dict, plan: Plan, module: str, scale: float) -> torch.Tensor:
    """DoRA's ||W0 + s·B·A|| per output feature of an (in, out) weight, whose blocks of rows hold only some
    inputs: sums of squares accumulated in fp32 over one pass of the blocks."""
    A, B = factors(plan.tensors, module)
    squares = torch.zeros(info["shape"][1], dtype=torch.float32)
    for rows, block in _row_blocks(fd, offset, info):
        squares += merged_weight(block, A[:, rows], B, scale, True, torch.float32).square().sum(dim=0)
    return squares.sqrt_()


def _merged_rows(
    block,
    rows: slice,
    plan: Plan,
    module: str,
    scale: float,
    fan_in_fan_out: bool,
    dtype: torch.dtype,
    where: str,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows `rows` of the merged weight: the rows of s·B·A come from rows of B (or, with fan_in_fan_out,
    the weight is (in, out) and they come from columns of A). DoRA's factor is per output feature: from each
    whole row of the block, or for (in, out) weights from `norm`, the column norms (`_column_norms`)."""
    A, B = factors(plan.tensors, module)
    m = magnitude(plan.tensors, module)
    A, B = (A[:, rows], B) if fan_in_fan_out else (A, B[rows])
    try:
        if m is not None:
            return dora_merged_weight(block, A, B, m if fan_in_fan_out else m[rows], scale, fan_in_fan_out, dtype, norm)
        return merged_weight(block, A, B, scale, fan_in_fan_out, dtype)
    except FloatingPointError as e:
        raise UserError(
            f"{where} + the adapter's {module} is not finite in {dtype} ({e}); check the base "
            "weights or choose another --dtype; nothing was written"
        ) from e


@contextlib.contextmanager
def _one_thread():
    """Run the block math on one thread: each block is a few MiB of memory-bound work between reads and
    writes, and more threads only add synchronization (1.5 GB base on 2 cores: 5.5 s with 1, 7.1 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _copy_side_files(
    base_dir: str, out_dir: str, dtype: torch.dtype | None, vocab_size: int | None = None, adapter_dir: str = ""
) -> list[str]:
    """Copy config, generation config, tokenizer and every other non-weight file; record a --dtype cast and a
    grown vocab_size. An adapter that carries a tokenizer (--add_tokens) gives the tokenizer instead of the base."""
    from lora_ds.vocab import TOKENIZER_PREFIXES, tokenizer_files

    tokenizer = tokenizer_files(adapter_dir) if adapter_dir else {}
    copied = []
    for name in sorted(os.listdir(base_dir)):
        src = os.path.join(base_dir, name)
        if not os.path.isfile(src) or name.endswith(_WEIGHT_SUFFIXES) or name == "adapter_config.json":
            continue
        if tokenizer and name.startswith(TOKENIZER_PREFIXES):
            continue
        if name == "config.json" and (dtype is not None or vocab_size is not None):
            model_config = read_json(src)
            if dtype is not None:
                # transformers 5 writes "dtype"; older files have "torch_dtype".
                field = "torch_dtype" if "torch_dtype" in model_config and "dtype" not in model_config else "dtype"
                model_config[field] = str(dtype).removeprefix("torch.")
            if vocab_size is not None:
                model_config["vocab_size"] = vocab_size
            write_json(os.path.join(out_dir, name), model_config)
        else:
            shutil.copy2(src, os.path.join(out_dir, name))
        copied.append(name)
    for name, text in tokenizer.items():
        write_text(os.path.join(out_dir, name), text)
        copied.append(f"{name} (the adapter's)")
    return copied


def merge_model_dir(
    base_dir: str,
    adapter_dir: str,
    out_dir: str,
    dtype: str | None = None,
    verify: bool = False,
    tolerance: float | None = None,
) -> dict:
    """Write base + adapter, merged, to `out_dir` as an HF model dir with no LoRA modules. Returns a report.

    `dtype` casts every floating tensor ("bf16", "fp16", "fp32"); by default each keeps its dtype.
    With `verify`, logits of base+adapter and of the merged model are compared before `out_dir` appears.
    """
    base_dir, adapter_dir, out_dir = (os.path.abspath(p) for p in (base_dir, adapter_dir, out_dir))
    for flag, path in (("--base", base_dir), ("--adapter", adapter_dir)):
        if out_dir == path or path.startswith(out_dir + os.sep):
            raise UserError(f"--out {out_dir}: would replace {flag} {path}; choose another output dir")
    plan = plan_merge(base_dir, adapter_dir, dtype)
    report = {
        "base": base_dir,
        "adapter": adapter_dir,
        "out": out_dir,
        "dtype": dtype or "as base",
        "shards": len(plan.base.shards),
        "tensors": sum(len(s.tensors) for s in plan.base.shards),
        "merged_modules": len(plan.targets),
        "replaced": sorted(plan.replaced),
        "scaling": scaling(plan.config),  # of modules no rank_pattern / alpha_pattern key selects
    }
    with atomic_dir(out_dir) as tmp:
        total = 0
        with _one_thread():
            for shard in plan.base.shards:
                total += _write_shard(plan, shard, os.path.join(tmp, shard.name))
        if plan.base.index is not None:
            index = dict(plan.base.index, metadata=dict(plan.base.index.get("metadata") or {}, total_size=total))
            write_json(os.path.join(tmp, INDEX_FILE), index)
        report["bytes_written"] = total
        report["copied"] = _copy_side_files(base_dir, tmp, plan.dtype, plan.vocab_size, adapter_dir)
        write_json(
            os.path.join(tmp, RECORD_FILE),
            {
                "adapter_config": plan.config,
                "adapter": adapter_dir,
                "base": base_dir,
                "dtype": report["dtype"],
                "scaling": report["scaling"],
                "merged": {k: m for k, m in sorted(plan.targets.items())},
                "replaced": sorted(plan.replaced),
            },
        )
        if verify:
            report["verify"] = verify_merge(plan, tmp, tolerance)
    return report


# ---------------------------------------------------------------- verification

VERIFY_PROMPTS = [
    "The capital of France is",
    "SELECT name FROM table WHERE",
    "Summarize the dialogue:\nA: Are we still on for lunch?\nB: Yes, at noon.",
    "Premise: A man is playing a guitar. Hypothesis: A person makes music. Answer:",
]


def _prompt_ids(base_dir: str, vocab_size: int) -> list[torch.Tensor]:
    """A few prompts through the base's tokenizer; fixed random ids when the base dir has none."""
    from lora_ds.tokenizer import HF_TOKENIZER_FILES, load_tokenizer

    if any(os.path.exists(os.path.join(base_dir, f)) for f in (*HF_TOKENIZER_FILES, "tokenizer.model")):
        tok = load_tokenizer(base_dir)
        return [torch.tensor([tok.with_bos(tok.encode(p))]) for p in VERIFY_PROMPTS]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 32), generator=generator) for _ in VERIFY_PROMPTS]


@torch.no_grad()
def _logits(model, prompts) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits.float() for ids in prompts]


def verify_merge(plan: Plan, merged_dir: str, tolerance: float | None = None) -> dict:
    """Max |logit| difference of base+adapter (our LoRA layers) against the merged model, both in fp32.

    Loads one model at a time. Raises UserError when the difference exceeds `tolerance` x max(1, max |logit|)
    (default tolerance by the stored dtype).
    """
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import inject_adapter
    from lora_ds.lora import lora_parameters

    model = AutoModelForCausalLM.from_pretrained(plan.base.path, dtype=torch.float32).eval()
    prompts = _prompt_ids(plan.base.path, model.get_input_embeddings().num_embeddings)
    base_logits = _logits(model, prompts)
    saved = saved_tensors(plan.tensors)
    load_saved_modules(model, saved)
    inject_adapter(model, plan.config, sorted(set(plan.targets.values())))
    params = lora_parameters(model)
    with torch.no_grad():
        for name, value in plan.tensors.items():
            if name in saved:
                continue
            found = [p for n, p in params.items() if n == name or n.endswith("." + name)]
            if len(found) != 1:
                raise UserError(
                    f"--verify: adapter tensor {name} matches {len(found)} LoRA parameters of the "
                    "base model; cannot build base+adapter"
                )
            found[0].copy_(value)
    ref_logits = _logits(model.eval(), prompts)
    del model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    leftover = [n for n, _ in merged.named_modules() if "lora_" in n or n.endswith("base_layer")]
    out_logits = _logits(merged, prompts)
    del merged
    if leftover:
        raise UserError(f"--verify: the merged model still has LoRA modules ({leftover[0]}); nothing was written")
    diff = max((a - b).abs().max().item() for a, b in zip(ref_logits, out_logits))
    effect = max((a[..., : b.size(-1)] - b).abs().max().item() for a, b in zip(ref_logits, base_logits))
    scale = max(1.0, max(a.abs().max().item() for a in ref_logits))
    rel = tolerance if tolerance is not None else VERIFY_TOLERANCE[_stored_dtype(plan)]
    result = {
        "prompts": len(prompts),
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "tolerance": rel * scale,
        "adapter_effect": effect,
    }
    if not diff <= rel * scale:
        raise UserError(
            f"--verify: merged logits differ from base+adapter by {diff:.3g} (> tolerance "
            f"{rel:g} x {scale:.3g}; the adapter itself moves them by {effect:.3g}); nothing was written"
        )
    return result


def load_saved_modules(model, saved: dict) -> None:
    """Put an adapter's modules trained in full (`saved`: {"<module>.<param>": T}) into `model` (no ZeRO-3), its
    embeddings first grown to their rows (PEFT needs the same: resize the base before loading such an adapter)."""
    rows = [t.shape[0] for n, t in saved.items() if t.dim() == 2]
    embedding = model.get_input_embeddings()
    if rows and max(rows) > embedding.num_embeddings:
        model.resize_token_embeddings(max(rows), mean_resizing=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in saved.items():
            found = params.get(name)
            if found is None or found.shape != value.shape:
                raise UserError(
                    f"the adapter's {name} {list(value.shape)} has no counterpart in this model "
                    f"({list(found.shape) if found is not None else 'none'}); pass the base it was trained on"
                )
            found.copy_(value)


def _stored_dtype(plan: Plan) -> torch.dtype:
    """The coarsest dtype of any tensor the merge changes (merged or cast): what sets the logit error."""
    changed = {
        plan.out_dtype(info)
        for shard in plan.base.shards
        for key, info in shard.tensors.items()
        if key in plan.targets or key in plan.replaced or plan.out_dtype(info) != info["dtype"]
    }
    return max((FLOATS[name] for name in changed), key=VERIFY_TOLERANCE.get)


# ---------------------------------------------------------------- a live model


def _restore(weight: torch.Tensor, copy: torch.Tensor) -> None:
    from lora_ds.zero import is_partitioned

    if not is_partitioned(weight):
        weight.data.copy_(copy)
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        weight.partition()  # drop the gathered merged copy; the next forward gathers the restored partition
    weight.ds_tensor.copy_(copy)


def merge_live(layer) -> None:
    """Merge one LoRA layer of a live model into its base weight (`LoRALinear.merge`: the fp32 math of the dir
    merge), on the gathered weights under ZeRO-3: collective, every rank must call it."""
    from lora_ds.zero import gathered

    params = [layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight]
    with gathered(params + ([layer.lora_magnitude_vector] if layer.use_dora else []), modifier_rank=0):
        layer.merge()


@contextlib.contextmanager
def merged_for_eval(model):
    """Merge every LoRA layer of `model` into its base weight inside the block (the forward then costs what
    the base's does). On exit each base weight is restored bit for bit from a copy of what this rank holds
    (its ZeRO-3 partition, or the whole weight without ZeRO-3), so training continues from unchanged weights.
    Under ZeRO-3 every rank must enter: gathering is collective.
    """
    from lora_ds.lora import lora_modules
    from lora_ds.zero import is_partitioned

    layers = [m for _, m in lora_modules(model)]
    if any(m.merged for m in layers):
        raise RuntimeError("merged_for_eval: some LoRA layers are already merged; unmerge them first")
    saved = []
    try:
        for layer in layers:
            weight = layer.base_layer.weight
            saved.append((layer, (weight.ds_tensor if is_partitioned(weight) else weight.data).detach().clone()))
            merge_live(layer)
        yield model
    finally:
        with torch.no_grad():
            for layer, copy in saved:
                _restore(layer.base_layer.weight, copy)
                layer.merged = False
