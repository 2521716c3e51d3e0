"""Reading the files users download into raw records, each with where it is (file:line, or Parquet row).

What every task's readers share: JSON lines, one JSON list, CSV/TSV, Parquet, `datasets` save_to_disk dirs, and
the checks of a record's fields. A reader yields `(Loc, dict or BadRecord)`; a problem with the whole file is a
UserError.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass

from lora_ds.errors import UserError


class BadRecord(UserError):
    """What is wrong with one example ("file:line: field 'x' ..."); fatal unless --skip_bad, which skips
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
    if text[pos + 1 :].strip():
        raise UserError(f"{path}: text after the closing ']' of the list; fix the file")


def first_char(path: str) -> str:
    """The first character of a text file past a BOM and white space ("[" for a JSON list)."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1].decode("ascii", "replace")


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
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
                    yield (
                        loc,
                        BadRecord(
                            f"{loc}: {len(fields)} fields where the header has {len(header)} ({', '.join(header)})"
                        ),
                    )
                else:
                    yield loc, dict(zip(header, fields))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{start}: not UTF-8 text ({e.reason}); convert the file to UTF-8") from e
        except csv.Error as e:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise UserError(f"{path}:{start}: unreadable {kind} ({e}); fix the file") from e


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


def saved_dataset(path: str):
    """The `datasets.Dataset` a `save_to_disk` dir holds (one split)."""
    from datasets import Dataset, load_from_disk

    try:
        dataset = load_from_disk(path)
    except FileNotFoundError as e:
        raise UserError(f"--src {path}: a directory, but not one written by datasets' save_to_disk ({e})") from e
    if not isinstance(dataset, Dataset):
        raise UserError(f"--src {path}: holds the splits {', '.join(dataset)}; pass one split's dir ({path}/NAME)")
    return dataset


def saved_dataset_files(path: str) -> list[str]:
    """The files of a `save_to_disk` dir (its Arrow shards, dataset_info.json, state.json)."""
    return sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


def read_saved_dataset(path: str):
    """(Loc, dict) per row of a `save_to_disk` dir, counted as rows like Parquet's."""
    n = 0
    for table in saved_dataset(path).with_format("arrow").iter(batch_size=1024):
        for row in table.to_pylist():
            n += 1
            yield Loc(path, n, "row"), row


def read_export(path: str):
    """The records of a Hugging Face export: a .parquet file's rows, or else JSON lines."""
    return read_parquet(path) if path.endswith(".parquet") else read_jsonl(path)


def check_columns(path: str, columns: list[str], required: tuple[str, ...], what: str) -> None:
    """A file-level error naming the first of `required` missing from `columns`."""
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (found: {', '.join(columns)}); expected {what}")


def mixed(loc: Loc, this: str, other: str) -> BadRecord:
    """The error for a record whose layout is not the one its file began with."""
    return BadRecord(
        f"{loc}: this record has the {this} layout, but the file began in the {other} layout; "
        "one file must hold one format"
    )


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
