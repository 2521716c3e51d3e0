"""Training data: encoding examples (prompt/completion pairs, chat turns), reading prepared dirs and JSONL, batching.

A prepared directory (written by `lora-ds prep`, data_prep/) is a `datasets` Arrow dataset saved with
`save_to_disk` plus `manifest.json`. Its rows have `input_ids`, `labels` (-100 over the context) and
`position_ids` (restarting at 0 where a packed example starts); other columns are ignored here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from lora_ds.errors import UserError

IGNORE_INDEX = -100
FLEX_BLOCK = 128  # FlexAttention's block size


def encode_spans(spans: list[tuple[list[int], bool]], max_len: int | None = None, truncate: bool = True, keep: int = 0):
    """Ids and labels of one example made of token spans `[(ids, trained)]`: the loss covers the trained spans only.

    The last span is the target (a completion, or a conversation's last assistant turn) and is never cut: an
    overlong example loses tokens from the left of what precedes it, after its first `keep` (a BOS, which stays).
    With `truncate` False, or when the target alone does not fit, None is returned (the example is dropped).
    Returns (row, truncated) where row has input_ids, labels, position_ids.
    """
    if not spans or not spans[-1][1]:
        raise ValueError("an example ends with a trained span")
    ids = [t for span, _ in spans for t in span]
    labels = [t if trained else IGNORE_INDEX for span, trained in spans for t in span]
    target = len(ids) - len(spans[-1][0])  # where the last span starts
    truncated = False
    if max_len is not None and len(ids) > max_len:
        room = max_len - (len(ids) - target)  # for what precedes the target
        if not truncate or room < max(keep, 1):
            return None, False
        cut = target - (room - keep)  # ids[keep:cut] are dropped
        ids, labels = ids[:keep] + ids[cut:], labels[:keep] + labels[cut:]
        truncated = True
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}, truncated


def encode_pair(tok, prompt: str, completion: str, max_len: int | None = None, truncate: bool = True):
    """Ids and labels of one example: [BOS] prompt completion EOS, loss on completion + EOS only (`encode_spans`)."""
    bos = tok.with_bos([])
    spans = [(bos, False), (tok.encode(prompt), False), (tok.encode(completion) + [tok.eos_token_id], True)]
    return encode_spans(spans, max_len, truncate, keep=len(bos))


def encode_turns(tok, turns: list[tuple[str, bool]], max_len: int | None = None, truncate: bool = True):
    """Ids and labels of a conversation as its chat template wrote it, `[(text, trained)]` ending with an assistant
    turn: the template writes BOS and end-of-turn tokens itself (`Tokenizer.encode_special`). See `encode_spans`."""
    spans = [(tok.encode_special(text), trained) for text, trained in turns]
    starts_with_bos = tok.bos_token_id is not None and spans[0][0][:1] == [tok.bos_token_id]
    return encode_spans(spans, max_len, truncate, keep=int(starts_with_bos))


def read_jsonl_pairs(path: str, tok, max_len: int) -> list[dict]:
    """Rows of a JSONL file of {"prompt", "completion"} records (overlong contexts are cut from the left)."""
    from lora_ds.fsutil import read_jsonl

    rows = []
    for lineno, record in read_jsonl(path):
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise UserError(
                    f"{path}:{lineno}: field {key!r} is missing or not a string; each line needs "
                    '{"prompt": ..., "completion": ...}'
                )
        row, _ = encode_pair(tok, record["prompt"], record["completion"], max_len)
        if row is None:
            raise UserError(f"{path}:{lineno}: the completion alone exceeds --max_len {max_len}; raise --max_len")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no records; the data file is empty")
    return rows


class PreparedRows:
    """Rows of a prepared dir (lora-ds prep), read lazily from its Arrow files (memory-mapped)."""

    def __init__(self, path: str):
        from datasets import load_from_disk

        from lora_ds.fsutil import read_json

        self.dataset = load_from_disk(path).select_columns(["input_ids", "labels", "position_ids"])
        if len(self.dataset) == 0:
            raise UserError(f"{path}: the prepared dataset has no rows")
        self.packed = bool(read_json(os.path.join(path, "manifest.json")).get("pack"))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(i)]


def load_rows(path: str, tok, max_len: int):
    """Rows from a prepared dir or a prompt/completion JSONL file."""
    import os

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise UserError(f"--data {path}: no manifest.json; prepare it with `lora-ds prep`")
        return PreparedRows(path)
    if not os.path.isfile(path):
        raise UserError(f"--data {path}: no such file or directory")
    if not path.endswith((".jsonl", ".json")):
        raise UserError(f"--data {path}: expected a prepared dir or a .jsonl file of prompt/completion records")
    return read_jsonl_pairs(path, tok, max_len)


class StepSampler:
    """Which rows each rank reads at each optimizer step: seeded per epoch, resumable at any step.

    A step takes the next micro × accum × world rows of the epoch's permutation, laid out as
    [accumulation step][rank][micro]; rows left over at an epoch's end are skipped. Being a pure
    function of (seed, step), the data position needs no state beyond the step counter.
    """

    def __init__(self, num_rows: int, micro: int, accum: int, world: int, seed: int, source: str = "--data"):
        self.n, self.micro, self.accum, self.world, self.seed = num_rows, micro, accum, world, seed
        self.per_step = micro * accum * world
        self.steps_per_epoch = num_rows // self.per_step
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{source}: {num_rows} rows, but one step needs {self.per_step} "
                f"(--micro_batch × --grad_accum × ranks); add data or lower the batch"
            )
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int):
        import torch

        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen), epoch
        return self._perm

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        chunk = self._permutation(epoch)[k * self.per_step : (k + 1) * self.per_step]
        return [
            chunk[(a * self.world + rank) * self.micro : (a * self.world + rank + 1) * self.micro].tolist()
            for a in range(self.accum)
        ]


def eval_shards(num_rows: int, micro: int, world: int, rank: int) -> list[list[int]]:
    """This rank's eval micro-batches; -1 pads so every rank runs the same number of forwards (ZeRO-3
    gathers weights collectively, so ranks must stay in lockstep)."""
    per_rank = -(-num_rows // world)
    mine = [i if i < num_rows else -1 for i in range(rank, per_rank * world, world)]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


@dataclass
class TrainBatches:
    """This rank's collated micro-batches of each optimizer step, as `sampler` deals them."""

    rows: Sequence[dict]
    sampler: StepSampler
    rank: int
    pad_id: int
    mask_dtype: object = None
    mask_from_positions: bool = False  # see collate

    @property
    def accum(self) -> int:
        return self.sampler.accum

    def step(self, step: int):
        """(batch, tokens read) of each micro-batch of `step`."""
        for indices in self.sampler.micro_batches(step, self.rank):
            rows = [self.rows[i] for i in indices]
            yield (
                collate(rows, self.pad_id, self.mask_dtype, self.mask_from_positions),
                sum(len(r["input_ids"]) for r in rows),
            )


@dataclass
class EvalBatches:
    """This rank's share of held-out rows in micro-batches; ranks short of rows get padding rows that count for
    nothing, so every rank runs the same number of forwards."""

    rows: Sequence[dict]
    micro: int
    rank: int
    world: int
    pad_id: int
    mask_dtype: object = None
    mask_from_positions: bool = False  # see collate

    def __iter__(self):
        for indices in eval_shards(len(self.rows), self.micro, self.world, self.rank):
            rows = []
            for i in indices:
                row = dict(self.rows[max(i, 0)])
                if i < 0:
                    row["labels"] = [IGNORE_INDEX] * len(row["labels"])
                rows.append(row)
            yield collate(rows, self.pad_id, self.mask_dtype, self.mask_from_positions)


def _is_packed(position_ids) -> bool:
    return any(p == 0 for p in position_ids[1:])


def collate(rows: list[dict], pad_id: int, mask_dtype=None, mask_from_positions: bool = False):
    """Right-pad rows into tensors: input_ids, labels, position_ids, attention_mask (none when no row is padded).

    Packed rows (position ids restarting at 0) get a 4-D block-causal mask, so attention never
    crosses an example boundary. With `mask_from_positions` (FlexAttention, and models with sliding-window
    layers: lora_ds.build.Trainable) they get no mask at all: transformers then builds each layer's mask from the
    position ids (a padding token, at position 0, is an example of its own), and no dense [B, 1, L, L] mask exists.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    if mask_from_positions:  # whole FlexAttention blocks: few distinct shapes to compile, no partial block
        width = -(-width // FLEX_BLOCK) * FLEX_BLOCK
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        pos[i, :n] = torch.tensor(r["position_ids"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}
    packed = any(_is_packed(r["position_ids"]) for r in rows)
    if not packed and bool(mask.all()):
        # No padding: the causal mask alone. Else transformers checks the mask for padding on the GPU, a host
        # sync at the start of every forward.
        del batch["attention_mask"]
        return batch
    if packed:
        if mask_from_positions:
            del batch["attention_mask"]
            return batch
        from lora_ds.packing import block_causal_mask

        # Additive mask in the compute dtype: SDPA needs the mask's dtype to match the queries'.
        batch["attention_mask"] = block_causal_mask(pos, mask, mask_dtype or torch.float32)
    return batch
