"""The data-prep pipeline, the same for every task: read and render (the task's module), encode, pack, save.

A prepared dir is one split saved with `datasets.Dataset.save_to_disk` (one shard) plus manifest.json.
Its columns: input_ids, labels (-100 over the context, so the loss covers the target and EOS only; for chat
data every assistant turn with its end-of-turn token),
position_ids (0 at the first token of every example: in a packed row they mark where examples start),
id (for a packed row, its examples' ids joined by ",") and length. The manifest records the task,
split, template, tokenizer, settings, counts, token-length statistics and every source file's sha256.
The same input gives a byte-identical dir, whatever --num_proc.

The task's module (lora_ds/tasks/<task>.py) tells each file's format and reads it: `(Loc, record)` per
example, the record None for one the source itself marks unusable (MNLI's "-" gold label) or the
`BadRecord` describing what is wrong. Records are rendered and encoded after the tokenizer is loaded (chat data
is rendered by the tokenizer's chat template), in --num_proc worker processes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

from lora_ds.config import flag_spellings
from lora_ds.errors import UserError
from lora_ds.fsutil import sha256_file
from lora_ds.tasks import CHAT, get_task
from lora_ds.tasks.chat import BUILTIN
from lora_ds.tasks.reading import BadRecord

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_MAX_LEN = 2048
FIX = "fix or remove the record, or pass --skip_bad to skip such records"
MAX_SKIPPED_LISTED = 100
_CHUNK = 256  # examples per job sent to a worker


# ---- encoding, packing, saving ---------------------------------------------------------------------


class Encoder:
    """An example's row from its record: rendered by the task's template, or by the run's chat template, and
    encoded (lora_ds.data); in every worker process the same."""

    def __init__(self, task_name: str, tok, template: str | None, max_len: int, truncate: bool):
        self.task, self.tok, self.max_len, self.truncate = get_task(task_name), tok, max_len, truncate
        self.chat = self.task.chat_template(tok, template) if task_name == CHAT else None

    @property
    def template(self) -> dict:
        """The template, as the manifest records it."""
        return self.chat.record if self.chat else self.task.TEMPLATE

    def __call__(self, example: tuple) -> tuple:
        """(row, truncated) of a (Loc, record); the row None for one too long, the BadRecord for a conversation the
        chat template refuses."""
        from lora_ds.data import encode_pair, encode_turns

        loc, record = example
        if self.chat is None:
            return encode_pair(self.tok, *self.task.render(record), self.max_len, self.truncate)
        try:
            turns = self.chat.turns(loc, record["messages"])
        except BadRecord as e:
            return e, False
        return encode_turns(self.tok, turns, self.max_len, self.truncate)


_worker_encoder = None


def _init_worker(task: str, tokenizer_path: str, template: str | None, max_len: int, truncate: bool) -> None:
    global _worker_encoder  # one per worker process, its tokenizer loaded once
    from lora_ds.tokenizer import load_tokenizer

    _worker_encoder = Encoder(task, load_tokenizer(tokenizer_path), template, max_len, truncate)


def _encode_chunk(examples: list) -> list:
    return [_worker_encoder(example) for example in examples]


def encode_all(encoder: Encoder, s: Settings, examples: list) -> list:
    """`encoder` of every (Loc, record), in order; with --num_proc > 1 in a process pool."""
    if s.num_proc == 1:
        return [encoder(example) for example in examples]
    import multiprocessing

    jobs = [examples[i : i + _CHUNK] for i in range(0, len(examples), _CHUNK)]
    init = (s.task, s.tokenizer, s.template, s.max_len, not s.drop_overlong)
    with multiprocessing.get_context().Pool(s.num_proc, _init_worker, init) as pool:
        return [result for chunk in pool.imap(_encode_chunk, jobs) for result in chunk]


def length_stats(lengths: list[int]) -> dict:
    """min / mean / p50 / p90 / p99 / max (nearest-rank percentiles) and the total."""
    s = sorted(lengths)

    def rank(p):
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    return {
        "count": len(s),
        "min": s[0],
        "mean": round(sum(s) / len(s), 2),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": s[-1],
        "total": sum(s),
    }


def save_rows(rows: list[dict], directory: str, split: str, fingerprint: str) -> None:
    """`save_to_disk` as one shard; the fingerprint is given, so no random or time-based state is written."""
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, Features, List, NamedSplit, Value
    from datasets.table import InMemoryTable
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    ints = List(Value("int32"))
    features = Features(
        {"input_ids": ints, "labels": ints, "position_ids": ints, "id": Value("string"), "length": Value("int32")}
    )
    table = pa.Table.from_pydict({key: [r[key] for r in rows] for key in features}, schema=features.arrow_schema)
    dataset = Dataset(
        InMemoryTable(table), info=DatasetInfo(features=features), split=NamedSplit(split), fingerprint=fingerprint
    )
    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        dataset.save_to_disk(directory, num_shards=1)
    finally:
        if not quiet:
            enable_progress_bars()


# ---- the pipeline ----------------------------------------------------------------------------------


@dataclass
class Settings:
    """What `prepare` is asked to do (the command-line flags)."""

    task: str
    src: list[str]
    tokenizer: str
    out: str
    split: str = "train"
    max_len: int | None = None
    pack: int | None = None
    num_proc: int = 1
    skip_bad: bool = False
    drop_overlong: bool = False
    template: str | None = None

    def __post_init__(self):
        if self.template is not None and self.task != CHAT:
            raise UserError(f"--template {self.template}: only `prep chat` takes a template; {self.task} has its own")
        if self.template is not None and self.template not in BUILTIN:
            raise UserError(f"--template {self.template}: choose one of {', '.join(BUILTIN)}")
        if not re.fullmatch(r"\w+(\.\w+)*", self.split):
            raise UserError(f"--split {self.split!r}: use letters, digits and _ (e.g. train, dev_matched)")
        if self.pack is not None and self.pack < 2:
            raise UserError(f"--pack {self.pack}: a packed row needs at least 2 tokens")
        if self.max_len is None:
            self.max_len = self.pack or DEFAULT_MAX_LEN
        if self.max_len < 2:
            raise UserError(f"--max_len {self.max_len}: an example needs at least 2 tokens")
        if self.pack is not None and self.max_len > self.pack:
            raise UserError(
                f"--max_len {self.max_len} is longer than --pack {self.pack}: an example must fit "
                "in a packed row; lower --max_len or raise --pack"
            )
        if self.num_proc < 1:
            raise UserError(f"--num_proc {self.num_proc}: give 1 or more processes")
        if not os.path.exists(self.tokenizer):  # checked now: the tokenizer is loaded after reading
            raise UserError(f"--tokenizer {self.tokenizer}: no such file or directory")


def _detect_sources(task, paths: list[str]) -> tuple[str, list[str]]:
    """The one format of all `paths` and every file they read; mixed formats are an error."""
    formats, files = {}, []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"--src {path}: no such file or directory")
        if os.path.isdir(path) and task.NAME != CHAT:
            raise UserError(f"--src {path}: a directory; pass the files it holds")
        fmt, read = task.detect(path)
        formats[path] = fmt
        files += [f for f in read if f not in files]
    if len(set(formats.values())) > 1:
        listing = "; ".join(f"{path} is {fmt}" for path, fmt in formats.items())
        raise UserError(f"--src mixes formats ({listing}); prepare one format at a time")
    return next(iter(formats.values())), files


def _check_out(out: str) -> None:
    """Refuse to replace a directory that is not an earlier prepared dir (it may hold anything)."""
    if os.path.exists(out) and not (
        os.path.isdir(out) and (not os.listdir(out) or os.path.isfile(os.path.join(out, MANIFEST)))
    ):
        raise UserError(f"--out {out}: exists and is not a prepared dir; choose another --out or remove it")


def _skip(s: Settings, bad: BadRecord, counts: dict, skipped: list) -> None:
    """A malformed record: fatal, or with --skip_bad counted and listed."""
    if not s.skip_bad:
        raise UserError(f"{bad}; {FIX}") from bad
    counts["skipped"] += 1
    if len(skipped) < MAX_SKIPPED_LISTED:
        skipped.append(str(bad))


def _read_examples(s: Settings, task, fmt: str, counts: dict, skipped: list) -> list:
    """(Loc, record) of every usable record of --src."""
    examples = []
    for path in s.src:
        for loc, record in task.read(path, fmt):
            counts["read"] += 1
            if isinstance(record, BadRecord):
                _skip(s, record, counts, skipped)
            elif record is None:
                counts["filtered"] += 1
            else:
                examples.append((loc, record))
    return examples


def _encode_examples(s: Settings, encoder: Encoder, examples: list, counts: dict, skipped: list) -> list[dict]:
    """The rows of the examples that fit --max_len (after truncation, unless --drop_overlong)."""
    rows = []
    for (_, record), (row, truncated) in zip(examples, encode_all(encoder, s, examples)):
        if isinstance(row, BadRecord):
            _skip(s, row, counts, skipped)
            continue
        if row is None:
            counts["dropped"] += 1
            continue
        counts["truncated"] += truncated
        row.update(id=record["id"], length=len(row["input_ids"]))
        rows.append(row)
    if not rows:
        raise UserError(
            f"--src {' '.join(s.src)}: no examples left ({counts['read']} read, {counts['skipped']} "
            f"skipped, {counts['filtered']} filtered, {counts['dropped']} longer than --max_len)"
        )
    if s.pack and any("," in r["id"] for r in rows):
        bad = next(r["id"] for r in rows if "," in r["id"])
        raise UserError(
            f"--pack: example id {bad!r} holds a ',', which separates the ids of a packed row; prepare without --pack"
        )
    return rows


def prepare(s: Settings) -> tuple[dict, float]:
    """Read, render, encode, (pack) and save one split; returns the manifest and the seconds spent
    doing so (kept out of the manifest, which must not vary).

    Nothing appears at `s.out` unless everything succeeds (it is built in a temp dir and renamed).
    """
    from lora_ds.fsutil import atomic_dir, write_json
    from lora_ds.packing import pack_rows
    from lora_ds.tokenizer import load_tokenizer, tokenizer_record

    task = get_task(s.task)
    _check_out(s.out)
    fmt, files = _detect_sources(task, s.src)
    counts = dict.fromkeys(("read", "filtered", "skipped", "dropped", "truncated", "kept", "rows"), 0)
    skipped = []
    start = time.perf_counter()
    examples = _read_examples(s, task, fmt, counts, skipped)

    # Loaded only now, so bad input fails fast. Loading it and importing `datasets` are fixed start-up
    # costs, kept out of the throughput.
    loading = time.perf_counter()
    tok = load_tokenizer(s.tokenizer)
    encoder = Encoder(s.task, tok, s.template, s.max_len, not s.drop_overlong)
    importlib.import_module("datasets")
    start += time.perf_counter() - loading

    rows = _encode_examples(s, encoder, examples, counts, skipped)
    counts["kept"] = len(rows)
    lengths = [r["length"] for r in rows]
    if s.pack:
        rows = pack_rows(rows, s.pack)
    counts["rows"] = len(rows)
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": s.task,
        "split": s.split,
        "source_format": fmt,
        "sources": [{"path": f, "sha256": sha256_file(f)} for f in files],
        "template": encoder.template,
        "tokenizer": tokenizer_record(tok),
        "max_len": s.max_len,
        "overlong": "drop" if s.drop_overlong else "truncate context",
        "pack": s.pack,
        "counts": counts,
        "length_stats": length_stats(lengths),
        "skipped_records": skipped,
    }
    if s.pack:
        manifest["packed_length_stats"] = length_stats([r["length"] for r in rows])
    # The manifest pins the data (sources' sha256, tokenizer, settings), so it can name the dataset.
    fingerprint = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    with atomic_dir(s.out) as tmp:
        save_rows(rows, tmp, s.split, fingerprint)
        write_json(os.path.join(tmp, MANIFEST), manifest)
    return manifest, time.perf_counter() - start


# ---- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `lora-ds prep TASK` and `python -m data_prep.TASK`."""
    parser.add_argument(
        "--src",
        nargs="+",
        required=True,
        metavar="PATH",
        help="the downloaded file(s), all of one format (told from the name and content); chat also takes "
        "datasets' save_to_disk dirs",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="a Hugging Face tokenizer dir, a model dir, or a SentencePiece tokenizer.model",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the prepared dir to write")
    parser.add_argument("--split", default="train", help="split name recorded in the dataset (default: train)")
    parser.add_argument(
        *flag_spellings("--max_len"),
        type=int,
        default=None,
        metavar="N",
        help=f"tokens per example; longer ones lose context from the left (default: --pack, else {DEFAULT_MAX_LEN})",
    )
    parser.add_argument(
        *flag_spellings("--drop_overlong"),
        action="store_true",
        help="drop examples longer than --max_len instead of truncating their context",
    )
    parser.add_argument(
        "--pack",
        type=int,
        default=None,
        metavar="N",
        help="pack examples into rows of at most N tokens (attention stays inside each example)",
    )
    parser.add_argument(
        *flag_spellings("--num_proc"), type=int, default=1, metavar="K", help="tokenizer processes (default: 1)"
    )
    parser.add_argument(
        "--template",
        choices=BUILTIN,
        default=None,
        help="chat only: render with this built-in chat template instead of the tokenizer's own",
    )
    parser.add_argument(
        *flag_spellings("--skip_bad"),
        action="store_true",
        help="skip malformed records (counted in the manifest) instead of stopping at the first",
    )


def run(task: str, args: argparse.Namespace) -> int:
    """Prepare from parsed flags; prints one summary line with the throughput."""
    settings = Settings(
        task=task,
        src=args.src,
        tokenizer=args.tokenizer,
        out=args.out,
        split=args.split,
        max_len=args.max_len,
        pack=args.pack,
        num_proc=args.num_proc,
        skip_bad=args.skip_bad,
        drop_overlong=args.drop_overlong,
        template=args.template,
    )
    manifest, seconds = prepare(settings)
    c, stats = manifest["counts"], manifest["length_stats"]
    template = f" (chat template: {manifest['template']['chat_template']})" if task == CHAT else ""
    print(
        f"{task} {args.split}{template}: read {c['read']}, kept {c['kept']} ({c['truncated']} truncated, "
        f"{c['dropped']} dropped, {c['skipped']} skipped, {c['filtered']} filtered) -> {c['rows']} rows in "
        f"{args.out}; tokens/example mean {stats['mean']} p99 {stats['p99']} max {stats['max']}; "
        f"{seconds:.2f} s, {c['read'] / seconds:.0f} examples/s, {stats['total'] / seconds:.0f} tokens/s"
    )
    return 0


def main(task: str, commands: str, argv: list[str] | None = None) -> int:
    """`python -m data_prep.TASK`: the same as `lora-ds prep TASK`; --help shows `commands` (the entry
    point's docstring), then the task's formats."""
    parser = argparse.ArgumentParser(
        prog=f"python -m data_prep.{task}",
        description=f"{commands}\n{get_task(task).__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(task, args)
    except UserError as e:
        print(f"data_prep.{task}: error: {e}", file=sys.stderr)
        return 2
