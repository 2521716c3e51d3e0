"""Hugging Face model dirs on disk: config.json and safetensors weights, one file or shards with an index.

`read_model_dir` parses every shard's header (8-byte little-endian length, JSON) without touching the data and
checks it against the file's size and the index, so a damaged dir fails early, naming the file. Model checks
before training, the streaming merge and the analysis of base weights all read dirs through it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from lora_ds.errors import UserError
from lora_ds.fsutil import read_json

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors names of the floating dtypes.
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 << 20  # safetensors' own limit
_AGAIN = "copy, download or save it again"


@dataclass
class Shard:
    """One safetensors file: its tensors' header entries, file metadata and where the data starts."""

    name: str
    path: str
    tensors: dict
    metadata: dict | None
    data_start: int


@dataclass
class ModelDir:
    path: str
    shards: list
    index: dict | None
    where: dict  # tensor key -> Shard

    def weight_key(self, module: str) -> str | None:
        """The key of `module`'s weight: `<module>.weight`, or without the head's prefix (e.g. GPT-2 files
        saved from the bare `transformer`, whose modules are named `transformer.h.0...` in the model)."""
        for key in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight"):
            if key in self.where:
                return key
        return None

    def stored_key(self, name: str) -> str | None:
        """The key under which the files store the model's param `name`: itself, without the head's prefix (as
        `weight_key`), or under its name before transformers' renaming on load (GPT-NeoX's head, `lm_head` in the
        model, is stored as `embed_out`)."""
        for key in (name, name.split(".", 1)[-1]):
            if key in self.where:
                return key
        for renaming in _renamings(os.path.join(self.path, "config.json")):
            key, matched = renaming.reverse_transform().rename_source_key(name)
            if matched is not None and key in self.where:
                return key
        return None

    def header(self, key: str) -> dict:
        """The safetensors header entry of `key`: dtype, shape, data_offsets."""
        return self.where[key].tensors[key]


def _renamings(config_path: str) -> list:
    """transformers' key renamings (checkpoint name -> model name) of the architecture in `config_path`."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    config = read_json(config_path) if os.path.isfile(config_path) else {}
    found = []
    for name in [*(config.get("architectures") or []), config.get("model_type")]:
        found += [t for t in get_checkpoint_conversion_mapping(name) or [] if isinstance(t, WeightRenaming)]
    return found


def read_shard(path: str) -> Shard:
    """The header of the safetensors file `path`, checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= _MAX_HEADER:
            raise UserError(f"{path}: not a safetensors file (bad header length); {_AGAIN}")
        if length > size - 8:
            raise UserError(f"{path}: truncated ({size} bytes, its header alone needs {8 + length}); {_AGAIN}")
        try:
            tensors = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: corrupt safetensors header ({e}); {_AGAIN}") from e
    metadata = tensors.pop("__metadata__", None)
    for key, info in tensors.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise UserError(f"{path}: corrupt safetensors header entry for {key}; {_AGAIN}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= size - 8 - length:
            raise UserError(f"{path}: tensor {key} lies past the end of the file; the shard is truncated")
    return Shard(os.path.basename(path), path, tensors, metadata, 8 + length)


def _shard_names(path: str, flag: str) -> tuple[list, dict | None]:
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index_path}: not a safetensors index (needs a 'weight_map' object); {_AGAIN}")
        return sorted(set(weight_map.values())), index
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return [SINGLE_FILE], None
    raise UserError(
        f"{flag} {path}: neither {INDEX_FILE} nor {SINGLE_FILE} is there; save the model with "
        "save_pretrained (safetensors)"
    )


def read_model_dir(path: str, flag: str) -> ModelDir:
    """The shards of the model dir `path` (given as `flag`), every header read and checked."""
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise UserError(f"{flag} {path}: {CONFIG_FILE} is missing; give a Hugging Face model dir")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise UserError(f"{flag} {path}: no *.safetensors weights; convert the checkpoint to safetensors")
    names, index = _shard_names(path, flag)
    shards = []
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"{flag} {path}: shard {name} (listed in {INDEX_FILE}) is missing")
        shards.append(read_shard(os.path.join(path, name)))
    where = {key: shard for shard in shards for key in shard.tensors}
    if index is not None and set(index["weight_map"]) != set(where):
        odd = sorted(set(index["weight_map"]) ^ set(where))[:3]
        raise UserError(f"{os.path.join(path, INDEX_FILE)}: weight_map and the shards disagree (e.g. {odd}); {_AGAIN}")
    return ModelDir(path, shards, index, where)
