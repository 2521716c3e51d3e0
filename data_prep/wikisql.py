"""Prepare WikiSQL (table schema + question -> SQL) from the downloaded files, offline.

    python -m data_prep.wikisql --src data/train.jsonl --tokenizer /models/llama-7b --out prepared/wikisql
    python -m data_prep.wikisql --src data/dev.jsonl --split dev --tokenizer /models/llama-7b --out prepared/wikisql-dev
    lora-ds prep wikisql --src wikisql/train-*.parquet --tokenizer /models/llama-7b --out prepared/wikisql

Formats, told from the file name and its first record:
  original  the release's `{split}.jsonl` ({phase, table_id, question, sql: {sel, agg, conds}}), whose
            tables are read from `{split}.tables.jsonl` beside it ({id, header, types, rows, ...});
  hf        the Hugging Face export, .parquet or JSON lines (question, table{header, types, ...},
            sql{sel, agg, conds{column_index, operator_index, condition}}).
WikiSQL records carry no id: an example's id is its file and line (or Parquet row), `train.jsonl:12`.
The prompt and SQL are rendered by lora_ds.tasks.wikisql. A bad line of the tables file is always an
error (--skip-bad skips questions, not tables).
"""
from __future__ import annotations

import math
import os
import sys

from data_prep import common
from data_prep.common import BadRecord, Loc, attempt, check, field, index, text
from lora_ds.errors import UserError
from lora_ds.tasks.wikisql import AGG_OPS, COND_OPS

ORIGINAL, HF = "original", "hf"
EXPECTED = ("the original release's {split}.jsonl (with {split}.tables.jsonl beside it) or the Hugging Face "
            "export (.parquet or .jsonl with question, table, sql)")


def tables_file(path: str) -> str:
    """The tables file of an original-release questions file: train.jsonl -> train.tables.jsonl."""
    return os.path.splitext(path)[0] + ".tables.jsonl"


def detect(path: str) -> tuple[str, list[str]]:
    """(format, files read) of a WikiSQL file."""
    name = os.path.basename(path)
    if name.endswith(".tables.jsonl"):
        raise UserError(f"--src {path}: this is a tables file; pass the questions file "
                        f"{name[:-len('.tables.jsonl')]}.jsonl (its tables are read from beside it)")
    if name.endswith(".parquet"):
        common.check_columns(path, common.parquet_columns(path), ("question", "table", "sql"), EXPECTED)
        return HF, [path]
    if name.endswith((".jsonl", ".json")):
        loc, first = common.first_jsonl_record(path)
        if "table_id" in first:
            tables = tables_file(path)
            if not os.path.isfile(tables):
                raise UserError(f"--src {path}: the original release's questions need their tables file {tables}; "
                                "put it beside the questions file")
            return ORIGINAL, [path, tables]
        if "table" in first and "sql" in first:
            return HF, [path]
        raise UserError(f"{loc}: a record with fields {', '.join(sorted(first))}; expected {EXPECTED}")
    raise UserError(f"--src {path}: not a WikiSQL file; expected {EXPECTED}")


def read(path: str, fmt: str):
    """(Loc, record or BadRecord) per question; a record is {id, question, header, types, sql}."""
    if fmt == ORIGINAL:
        tables = load_tables(tables_file(path))
        for loc, raw in common.read_jsonl(path):
            yield loc, attempt(_from_original, loc, raw, tables)
        return
    rows = common.read_parquet(path) if path.endswith(".parquet") else common.read_jsonl(path)
    for loc, raw in rows:
        yield loc, attempt(_from_hf, loc, raw)


def load_tables(path: str) -> dict:
    """{table id: (header, types)} of a tables file; any bad line is an error."""
    tables = {}
    for loc, raw in common.read_jsonl(path):
        try:
            if isinstance(raw, BadRecord):
                raise raw
            table_id = text(raw, "id", loc)
            header, types = _columns(raw, loc, "")
        except BadRecord as e:
            raise UserError(f"{e}; fix the tables file (--skip-bad does not apply to it)") from e
        if table_id in tables:
            raise UserError(f"{loc}: field 'id': table {table_id!r} appears twice; keep one of them")
        tables[table_id] = header, types
    return tables


def _columns(table: dict, loc: Loc, prefix: str) -> tuple[list[str], list[str]]:
    header = _strings(table, "header", loc, prefix + "header")
    types = _strings(table, "types", loc, prefix + "types")
    if len(types) != len(header):
        raise BadRecord(f"{loc}: field '{prefix}types' has {len(types)} entries, '{prefix}header' {len(header)}")
    return header, types


def _strings(raw: dict, key: str, loc: Loc, name: str) -> list[str]:
    values = field(raw, key, loc, (list,), "a list of strings", name)
    for i, value in enumerate(values):
        check(value, loc, f"{name}[{i}]", (str,), "a string")
    if not values:
        raise BadRecord(f"{loc}: field '{name}' is empty")
    return values


def _value(value, loc: Loc, name: str):
    """A condition value: a string, or a finite JSON number (the original release has both)."""
    check(value, loc, name, (str, int, float), "a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRecord(f"{loc}: field '{name}' is {value}, expected a finite number")
    return value


def _sel_agg(sql: dict, loc: Loc, header: list[str]) -> tuple[int, int]:
    sel = index(field(sql, "sel", loc, (int,), "an integer", "sql.sel"), loc, "sql.sel", len(header), "the header")
    agg = index(field(sql, "agg", loc, (int,), "an integer", "sql.agg"), loc, "sql.agg", len(AGG_OPS),
                f"the aggregation list {list(AGG_OPS)}")
    return sel, agg


def _cond(col, op, value, loc: Loc, names: list[str], header: list[str]) -> list:
    """[column, operator, value] checked; `names` are the three fields as the file calls them."""
    return [index(col, loc, names[0], len(header), "the header"),
            index(op, loc, names[1], len(COND_OPS), f"the operator list {list(COND_OPS)}"),
            _value(value, loc, names[2])]


def _from_original(loc: Loc, raw: dict, tables: dict) -> dict:
    if "table_id" not in raw and "table" in raw:
        raise common.mixed(loc, "Hugging Face export's", "original release's")
    question = text(raw, "question", loc)
    table_id = text(raw, "table_id", loc)
    if table_id not in tables:
        raise BadRecord(f"{loc}: field 'table_id': no table {table_id!r} in the tables file")
    header, types = tables[table_id]
    sql = field(raw, "sql", loc, (dict,), "an object")
    sel, agg = _sel_agg(sql, loc, header)
    conds = []
    for i, cond in enumerate(field(sql, "conds", loc, (list,), "a list", "sql.conds")):
        name = f"sql.conds[{i}]"
        if not isinstance(cond, list) or len(cond) != 3:
            raise BadRecord(f"{loc}: field '{name}' is {cond!r:.40}, expected [column, operator, value]")
        conds.append(_cond(*cond, loc, [f"{name}[{k}]" for k in range(3)], header))
    return {"id": loc.default_id, "question": question, "header": header, "types": types,
            "sql": {"sel": sel, "agg": agg, "conds": conds}}


def _from_hf(loc: Loc, raw: dict) -> dict:
    if "table" not in raw and "table_id" in raw:
        raise common.mixed(loc, "original release's", "Hugging Face export's")
    question = text(raw, "question", loc)
    header, types = _columns(field(raw, "table", loc, (dict,), "an object"), loc, "table.")
    sql = field(raw, "sql", loc, (dict,), "an object")
    sel, agg = _sel_agg(sql, loc, header)
    parts = field(sql, "conds", loc, (dict,), "an object of lists", "sql.conds")
    keys = ("column_index", "operator_index", "condition")
    lists = [field(parts, key, loc, (list,), "a list", f"sql.conds.{key}") for key in keys]
    if len({len(values) for values in lists}) > 1:
        raise BadRecord(f"{loc}: field 'sql.conds' has lists of different lengths "
                        f"({', '.join(f'{k}: {len(v)}' for k, v in zip(keys, lists))})")
    conds = [_cond(col, op, value, loc, [f"sql.conds.{key}[{i}]" for key in keys], header)
             for i, (col, op, value) in enumerate(zip(*lists))]
    return {"id": loc.default_id, "question": question, "header": header, "types": types,
            "sql": {"sel": sel, "agg": agg, "conds": conds}}


if __name__ == "__main__":
    sys.exit(common.main("wikisql"))
