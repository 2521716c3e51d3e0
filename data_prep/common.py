"""What every task's prep shares: reading the downloaded files, encoding, packing, saving, the CLI.

A prepared dir is one split saved with `datasets.Dataset.save_to_disk` (one shard) plus manifest.json.
Its columns: input_ids, labels (-100 over the context, so the loss covers the target and EOS only),
position_ids (0 at the first token of every example: in a packed row they mark where examples start),
id (for a packed row, its examples' ids joined by ",") and length. The manifest records the task,
split, template, tokenizer, settings, counts, token-length statistics and every source file's sha256.
The same input gives a byte-identical dir, whatever --num-proc.

A task module (data_prep/<task>.py) has `detect(path) -> (format, files read)` and
`read(path, format)`, which yields `(Loc, record)` per example: the normalized record, None for one
the source itself marks unusable (MNLI's "-" gold label), or the `BadRecord` describing what is wrong.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

from lora_ds.errors import UserError
from lora_ds.fsutil import sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_MAX_LEN = 2048
FIX = "fix or remove the record, or pass --skip-bad to skip such records"
MAX_SKIPPED_LISTED = 100
TAB = "\t"
_CHUNK = 256  # examples per task sent to a worker


class BadRecord(UserError):
    """What is wrong with one example ("file:line: field 'x' ..."); fatal unless --skip-bad, which skips
    and counts it. The advice on what to do is added where it is reported."""


@dataclass(frozen=True)
class Loc:
    """Where a record is: a line of a text file, or a row of a Parquet file (both counted from 1)."""

    path: str
    line: int
    unit: str = "line"

    def __str__(self):
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path}: row {self.line}"

    @property
    def default_id(self) -> str:
        """The id of a record whose source gives it none."""
        return f"{os.path.basename(self.path)}:{self.line}"


# ---- reading ---------------------------------------------------------------------------------------

def read_jsonl(path: str):
    """(Loc, dict or BadRecord) per non-blank line; lines may end in \\r\\n or \\n."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            loc = Loc(path, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, BadRecord(f"{loc}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            except UnicodeDecodeError as e:
                yield loc, BadRecord(f"{loc}: not UTF-8 text ({e.reason})")
                continue
            if not isinstance(obj, dict):
                yield loc, BadRecord(f"{loc}: expected a JSON object, found a {type(obj).__name__}")
                continue
            yield loc, obj


def first_jsonl_record(path: str) -> tuple[Loc, dict]:
    """The first record of a JSON-lines file, to tell its format; a file-level error if there is none."""
    for loc, obj in read_jsonl(path):
        if isinstance(obj, BadRecord):
            raise UserError(f"{obj}; the format of {path} is told from its first record")
        return loc, obj
    raise UserError(f"{path}: the file has no records")


def read_json_array(path: str):
    """(Loc, dict or BadRecord) per element of a file holding one JSON list, with each element's line.

    A syntax error stops the reading (the rest of the document cannot be trusted): a UserError.
    """
    text = read_text(path)
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    pos = space.match(text).end()
    if not text.startswith("[", pos):
        raise UserError(f"{path}: expected a JSON list of records ([{{...}}, ...])")
    pos, line, counted = pos + 1, 1, 0
    while True:
        pos = space.match(text, pos).end()
        if text.startswith("]", pos):
            break
        line += text.count("\n", counted, pos)
        counted = pos
        loc = Loc(path, line)
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file") from e
        if isinstance(obj, dict):
            yield loc, obj
        else:
            yield loc, BadRecord(f"{loc}: expected a JSON object, found a {type(obj).__name__}")
        pos = space.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            at = line + text.count("\n", counted, pos)
            raise UserError(f"{path}:{at}: expected ',' or ']' after a record; fix the file")
    if text[pos + 1:].strip():
        raise UserError(f"{path}: text after the closing ']' of the list; fix the file")


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason}); convert the file to UTF-8") from e


def delimited_header(path: str, delimiter: str, quoting: int) -> list[str]:
    """The first row of a CSV/TSV file."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f, delimiter=delimiter, quoting=quoting), None)
    if not header:
        raise UserError(f"{path}: the file is empty; expected a header row first")
    return header


def read_delimited(path: str, delimiter: str, quoting: int):
    """(Loc, dict or BadRecord) per row of a CSV/TSV file with a header; Loc is the row's first line.

    Read with the csv module (quoted fields may hold commas, newlines and \\r\\n, kept verbatim).
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        start = 1
        try:
            header = next(reader)
            start = reader.line_num + 1
            for fields in reader:
                loc = Loc(path, start)
                start = reader.line_num + 1
                if not fields:
                    continue
                if len(fields) != len(header):
                    yield loc, BadRecord(f"{loc}: {len(fields)} fields where the header has {len(header)} "
                                         f"({', '.join(header)})")
                else:
                    yield loc, dict(zip(header, fields))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{start}: not UTF-8 text ({e.reason}); convert the file to UTF-8") from e
        except csv.Error as e:
            raise UserError(f"{path}:{start}: unreadable {'TSV' if delimiter == TAB else 'CSV'} ({e}); "
                            "fix the file") from e


def parquet_columns(path: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from e


def read_parquet(path: str):
    """(Loc, dict) per row of a Parquet file; nested structs and lists become dicts and lists."""
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield Loc(path, n, "row"), row


def check_columns(path: str, columns: list[str], required: tuple[str, ...], what: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (found: {', '.join(columns)}); "
                        f"expected {what}")


def mixed(loc: Loc, this: str, other: str) -> BadRecord:
    """The error for a record whose layout is not the one its file began with."""
    return BadRecord(f"{loc}: this record has the {this} layout, but the file began in the {other} layout; "
                     "one file must hold one format")


def attempt(normalize, loc: Loc, raw, *args):
    """`normalize(loc, raw, *args)`, or the BadRecord it raised (or `raw`, if that already is one)."""
    if isinstance(raw, BadRecord):
        return raw
    try:
        return normalize(loc, raw, *args)
    except BadRecord as e:
        return e


# ---- fields ----------------------------------------------------------------------------------------

def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(value, loc: Loc, name: str, kinds: tuple, expected: str):
    """`value`, which must be one of `kinds` (never a bool where an int is meant)."""
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BadRecord(f"{loc}: field '{name}' is {_shown(value)}, expected {expected}")
    return value


def field(raw: dict, key: str, loc: Loc, kinds: tuple, expected: str, name: str | None = None):
    """`raw[key]`, which must be present and one of `kinds`; `name` is how messages call it."""
    if raw.get(key) is None:
        raise BadRecord(f"{loc}: field '{name or key}' is missing")
    return check(raw[key], loc, name or key, kinds, expected)


def text(raw: dict, key: str, loc: Loc, name: str | None = None) -> str:
    """A non-blank string field, verbatim."""
    value = field(raw, key, loc, (str,), "a string", name)
    if not value.strip():
        raise BadRecord(f"{loc}: field '{name or key}' is empty")
    return value


def index(value, loc: Loc, name: str, size: int, what: str) -> int:
    """`value`, which must be an int in range(size): an index into `what`."""
    check(value, loc, name, (int,), "an integer")
    if not 0 <= value < size:
        raise BadRecord(f"{loc}: field '{name}' is {value}, but {what} has {size} entries (0..{size - 1})")
    return value


def record_id(raw: dict, key: str, loc: Loc) -> str:
    """The source's id of a record (string or integer), or else its file and line."""
    value = raw.get(key)
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    return loc.default_id


# ---- encoding, packing, saving ---------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer  # one tokenizer per worker process, loaded once
    from lora_ds.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_chunk(job):
    from lora_ds.data import encode_pair

    pairs, max_len, truncate = job
    return [encode_pair(_worker_tokenizer, prompt, completion, max_len, truncate) for prompt, completion in pairs]


def encode_all(tok, tokenizer_path: str, pairs: list, max_len: int, truncate: bool, num_proc: int) -> list:
    """`encode_pair` of every (prompt, completion), in order; with num_proc > 1 in a process pool."""
    from lora_ds.data import encode_pair

    if num_proc == 1:
        return [encode_pair(tok, prompt, completion, max_len, truncate) for prompt, completion in pairs]
    import multiprocessing

    jobs = [(pairs[i:i + _CHUNK], max_len, truncate) for i in range(0, len(pairs), _CHUNK)]
    with multiprocessing.get_context().Pool(num_proc, _init_worker, (tokenizer_path,)) as pool:
        return [result for chunk in pool.imap(_encode_chunk, jobs) for result in chunk]


def length_stats(lengths: list[int]) -> dict:
    """min / mean / p50 / p90 / p99 / max (nearest-rank percentiles) and the total."""
    s = sorted(lengths)

    def rank(p):
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    return {"count": len(s), "min": s[0], "mean": round(sum(s) / len(s), 2), "p50": rank(50), "p90": rank(90),
            "p99": rank(99), "max": s[-1], "total": sum(s)}


def save_rows(rows: list[dict], directory: str, split: str, fingerprint: str) -> None:
    """`save_to_disk` as one shard; the fingerprint is given, so no random or time-based state is written."""
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, Features, List, NamedSplit, Value
    from datasets.table import InMemoryTable
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    ints = List(Value("int32"))
    features = Features({"input_ids": ints, "labels": ints, "position_ids": ints, "id": Value("string"),
                         "length": Value("int32")})
    table = pa.Table.from_pydict({key: [r[key] for r in rows] for key in features}, schema=features.arrow_schema)
    dataset = Dataset(InMemoryTable(table), info=DatasetInfo(features=features), split=NamedSplit(split),
                      fingerprint=fingerprint)
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

    def __post_init__(self):
        if not re.fullmatch(r"\w+(\.\w+)*", self.split):
            raise UserError(f"--split {self.split!r}: use letters, digits and _ (e.g. train, dev_matched)")
        if self.pack is not None and self.pack < 2:
            raise UserError(f"--pack {self.pack}: a packed row needs at least 2 tokens")
        if self.max_len is None:
            self.max_len = self.pack or DEFAULT_MAX_LEN
        if self.max_len < 2:
            raise UserError(f"--max-len {self.max_len}: an example needs at least 2 tokens")
        if self.pack is not None and self.max_len > self.pack:
            raise UserError(f"--max-len {self.max_len} is longer than --pack {self.pack}: an example must fit "
                            "in a packed row; lower --max-len or raise --pack")
        if self.num_proc < 1:
            raise UserError(f"--num-proc {self.num_proc}: give 1 or more processes")
        if not os.path.exists(self.tokenizer):  # checked now: the tokenizer is loaded after reading
            raise UserError(f"--tokenizer {self.tokenizer}: no such file or directory")


def _detect_sources(reader, paths: list[str]) -> tuple[str, list[str]]:
    """The one format of all `paths` and every file they read; mixed formats are an error."""
    formats, files = {}, []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--src {path}: no such file")
        fmt, read = reader.detect(path)
        formats[path] = fmt
        files += [f for f in read if f not in files]
    if len(set(formats.values())) > 1:
        listing = "; ".join(f"{path} is {fmt}" for path, fmt in formats.items())
        raise UserError(f"--src mixes formats ({listing}); prepare one format at a time")
    return next(iter(formats.values())), files


def _check_out(out: str) -> None:
    """Refuse to replace a directory that is not an earlier prepared dir (it may hold anything)."""
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out)
                                                             or os.path.isfile(os.path.join(out, MANIFEST)))):
        raise UserError(f"--out {out}: exists and is not a prepared dir; choose another --out or remove it")


def _read_examples(s: Settings, reader, template, fmt: str, counts: dict) -> tuple[list, list, list]:
    """(ids, (prompt, completion) pairs, skipped-record messages) of every usable record of --src."""
    ids, pairs, skipped = [], [], []
    for path in s.src:
        for loc, record in reader.read(path, fmt):
            counts["read"] += 1
            if isinstance(record, BadRecord):
                if not s.skip_bad:
                    raise UserError(f"{record}; {FIX}") from record
                counts["skipped"] += 1
                if len(skipped) < MAX_SKIPPED_LISTED:
                    skipped.append(str(record))
            elif record is None:
                counts["filtered"] += 1
            else:
                ids.append(record["id"])
                pairs.append(template.render(record))
    return ids, pairs, skipped


def _encode_examples(s: Settings, tok, ids: list, pairs: list, counts: dict) -> list[dict]:
    """The rows of the examples that fit --max-len (after truncation, unless --drop-overlong)."""
    rows = []
    for ex_id, (row, truncated) in zip(ids, encode_all(tok, s.tokenizer, pairs, s.max_len, not s.drop_overlong,
                                                       s.num_proc)):
        if row is None:
            counts["dropped"] += 1
            continue
        counts["truncated"] += truncated
        row.update(id=ex_id, length=len(row["input_ids"]))
        rows.append(row)
    if not rows:
        raise UserError(f"--src {' '.join(s.src)}: no examples left ({counts['read']} read, {counts['skipped']} "
                        f"skipped, {counts['filtered']} filtered, {counts['dropped']} longer than --max-len)")
    if s.pack and any("," in r["id"] for r in rows):
        bad = next(r["id"] for r in rows if "," in r["id"])
        raise UserError(f"--pack: example id {bad!r} holds a ',', which separates the ids of a packed row; "
                        "prepare without --pack")
    return rows


def prepare(s: Settings) -> tuple[dict, float]:
    """Read, render, encode, (pack) and save one split; returns the manifest and the seconds spent
    doing so (kept out of the manifest, which must not vary).

    Nothing appears at `s.out` unless everything succeeds (it is built in a temp dir and renamed).
    """
    from lora_ds.fsutil import atomic_dir, write_json
    from lora_ds.packing import pack_rows
    from lora_ds.tasks import get_task
    from lora_ds.tokenizer import load_tokenizer, tokenizer_record

    reader = importlib.import_module(f"data_prep.{s.task}")
    template = get_task(s.task)
    _check_out(s.out)
    fmt, files = _detect_sources(reader, s.src)
    counts = dict.fromkeys(("read", "filtered", "skipped", "dropped", "truncated", "kept", "rows"), 0)
    start = time.perf_counter()
    ids, pairs, skipped = _read_examples(s, reader, template, fmt, counts)

    # Loaded only now, so bad input fails fast. Loading it and importing `datasets` are fixed start-up
    # costs, kept out of the throughput.
    loading = time.perf_counter()
    tok = load_tokenizer(s.tokenizer)
    importlib.import_module("datasets")
    start += time.perf_counter() - loading

    rows = _encode_examples(s, tok, ids, pairs, counts)
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
        "template": template.TEMPLATE,
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
    parser.add_argument("--src", nargs="+", required=True, metavar="PATH",
                        help="the downloaded file(s), all of one format (told from the name and content)")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a Hugging Face tokenizer dir, a model dir, or a SentencePiece tokenizer.model")
    parser.add_argument("--out", required=True, metavar="DIR", help="the prepared dir to write")
    parser.add_argument("--split", default="train", help="split name recorded in the dataset (default: train)")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help=f"tokens per example; longer ones lose context from the left "
                             f"(default: --pack, else {DEFAULT_MAX_LEN})")
    parser.add_argument("--drop-overlong", action="store_true",
                        help="drop examples longer than --max-len instead of truncating their context")
    parser.add_argument("--pack", type=int, default=None, metavar="N",
                        help="pack examples into rows of at most N tokens (attention stays inside each example)")
    parser.add_argument("--num-proc", type=int, default=1, metavar="K", help="tokenizer processes (default: 1)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip malformed records (counted in the manifest) instead of stopping at the first")


def run(task: str, args: argparse.Namespace) -> int:
    """Prepare from parsed flags; prints one summary line with the throughput."""
    settings = Settings(task=task, src=args.src, tokenizer=args.tokenizer, out=args.out, split=args.split,
                        max_len=args.max_len, pack=args.pack, num_proc=args.num_proc, skip_bad=args.skip_bad,
                        drop_overlong=args.drop_overlong)
    manifest, seconds = prepare(settings)
    c, stats = manifest["counts"], manifest["length_stats"]
    print(f"{task} {args.split}: read {c['read']}, kept {c['kept']} ({c['truncated']} truncated, {c['dropped']} "
          f"dropped, {c['skipped']} skipped, {c['filtered']} filtered) -> {c['rows']} rows in {args.out}; "
          f"tokens/example mean {stats['mean']} p99 {stats['p99']} max {stats['max']}; "
          f"{seconds:.2f} s, {c['read'] / seconds:.0f} examples/s")
    return 0


def main(task: str, argv: list[str] | None = None) -> int:
    """`python -m data_prep.TASK`: the same as `lora-ds prep TASK`."""
    reader = importlib.import_module(f"data_prep.{task}")
    parser = argparse.ArgumentParser(prog=f"python -m data_prep.{task}", description=reader.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(task, args)
    except UserError as e:
        print(f"data_prep.{task}: error: {e}", file=sys.stderr)
        return 2
