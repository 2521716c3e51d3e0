"""Prepare SAMSum (dialogue -> summary) from the downloaded files, offline.

    python -m data_prep.samsum --src corpus/train.json --tokenizer /models/llama-7b --out prepared/samsum
    lora-ds prep samsum --src samsum/test.csv --split test --tokenizer /models/llama-7b --out prepared/samsum-test

Formats, told from the file name and its first character or header:
  corpus    the corpus release: one JSON list of {id, dialogue, summary} (train.json, val.json, test.json);
  csv       the CSV mirror (id, dialogue, summary; dialogues hold newlines and commas, so quoted fields);
  hf        the Hugging Face export, .parquet or JSON lines (id, dialogue, summary).
Line endings inside dialogues are mixed (\\r\\n and \\n); text is kept verbatim and split into
utterances by lora_ds.tasks.samsum.
"""
from __future__ import annotations

import csv
import os
import sys

from data_prep import common
from data_prep.common import Loc, attempt, record_id, text
from lora_ds.errors import UserError

CORPUS, CSV, HF = "corpus", "csv", "hf"
COLUMNS = ("dialogue", "summary")
EXPECTED = ("the SAMSum corpus .json list, the CSV mirror (.csv with id, dialogue, summary) or the Hugging "
            "Face export (.parquet or .jsonl with id, dialogue, summary)")


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1].decode("ascii", "replace")


def detect(path: str) -> tuple[str, list[str]]:
    """(format, files read) of a SAMSum file."""
    name = os.path.basename(path)
    if name.endswith(".csv"):
        header = common.delimited_header(path, ",", csv.QUOTE_MINIMAL)
        common.check_columns(path, header, COLUMNS, EXPECTED)
        return CSV, [path]
    if name.endswith(".parquet"):
        common.check_columns(path, common.parquet_columns(path), COLUMNS, EXPECTED)
        return HF, [path]
    if name.endswith(".json") and _first_char(path) == "[":
        return CORPUS, [path]
    if name.endswith((".jsonl", ".json")):
        loc, first = common.first_jsonl_record(path)
        if all(key in first for key in COLUMNS):
            return HF, [path]
        raise UserError(f"{loc}: a record with fields {', '.join(sorted(first))}; expected {EXPECTED}")
    raise UserError(f"--src {path}: not a SAMSum file; expected {EXPECTED}")


def read(path: str, fmt: str):
    """(Loc, record or BadRecord) per dialogue; a record is {id, dialogue, summary}."""
    if fmt == CORPUS:
        rows = common.read_json_array(path)
    elif fmt == CSV:
        rows = common.read_delimited(path, ",", csv.QUOTE_MINIMAL)
    elif path.endswith(".parquet"):
        rows = common.read_parquet(path)
    else:
        rows = common.read_jsonl(path)
    for loc, raw in rows:
        yield loc, attempt(_normalize, loc, raw)


def _normalize(loc: Loc, raw: dict) -> dict:
    return {"id": record_id(raw, "id", loc), "dialogue": text(raw, "dialogue", loc),
            "summary": text(raw, "summary", loc)}


if __name__ == "__main__":
    sys.exit(common.main("samsum"))
