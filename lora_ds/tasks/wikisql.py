"""WikiSQL (Zhong et al. 2017): table schema + question in, SQL out.

Formats, told from the file name and its first record:
  original  the release's `{split}.jsonl` ({phase, table_id, question, sql: {sel, agg, conds}}), whose
            tables are read from `{split}.tables.jsonl` beside it ({id, header, types, rows, ...});
  hf        the Hugging Face export, .parquet or JSON lines (question, table{header, types, ...},
            sql{sel, agg, conds{column_index, operator_index, condition}}).
WikiSQL records carry no id: an example's id is its file and line (or Parquet row), `train.jsonl:12`. A bad
line of the tables file is always an error (--skip_bad skips questions, not tables).

The SQL is written in a readable form that names the columns and parses back to exactly the
`(sel, agg, conds)` it came from:

    SELECT MAX("Goals") FROM table WHERE "Club" = 'Ayr United' AND "Season" > 1999

- Columns are double-quoted (`"` inside a name is doubled). A name that repeats in the header gets
  `#k` after its quotes on its k-th occurrence (`"Score"#2`), so every column has one reference.
- String values are single-quoted (`'` doubled); numbers are bare. The original release stores some
  condition values as JSON numbers: an int is written as `3`, a float as Python's `repr` (`3.0`,
  `2.5`, `1e+16`), which always has a `.` or an exponent, so `3` parses back to int 3 and `3.0` to
  float 3.0, and the string `'3'` stays a string. The Hugging Face export stores every value as a
  string, so its values are always quoted.

Scored as the official evaluator does (salesforce/WikiSQL `evaluate.py`, `lib/query.py`, `lib/dbengine.py`):
  logical form   sel, agg and the *set* of conditions equal, each condition as (col, op, str(value).lower()),
                 so a string '3' equals the number 3, but 3 and 3.0 differ (as in the official Query.__eq__);
  execution      both queries run with sqlite3 on the table (text lowercased, real columns numeric), string
                 values lowercased, a non-numeric value compared with a real column read as a number (commas
                 dropped, else its first number); the result lists must be equal.
A prediction that does not parse is wrong for both and counted under `unparsed`; a gold query that does not
execute (the official evaluator would stop) is wrong for execution and counted under `gold_exec_errors`.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
from decimal import Decimal, InvalidOperation

from lora_ds.errors import UserError
from lora_ds.tasks import reading
from lora_ds.tasks.reading import BadRecord, Loc, attempt, check, field, index, text

NAME = "wikisql"
AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")
COND_OPS = ("=", ">", "<", "OP")
TEMPLATE = {
    "name": NAME,
    "version": 1,
    "prompt": "Table: {schema}\nQuestion: {question}\nSQL:",
    "completion": " {sql}",
    "schema": 'the columns joined by " | ", each as <column> (<type>)',
    "sql": "SELECT [AGG(]<column>[)] FROM table [WHERE <column> <op> <value> [AND ...]]; <column> is "
    "\"name\" with \" doubled, plus #k on the k-th repeat of a name; <value> is 'text' with ' doubled, "
    "an int, or a float as Python repr",
}
MAX_NEW_TOKENS = 128
TABLE_COLUMNS = ("n", "lf_accuracy", "ex_accuracy", "unparsed", "gold_exec_errors")
SPLIT_NAMES = ()
CHOICES = None
# OFFICIAL, the official evaluator's predictions format, is defined at the end.

ORIGINAL, HF = "original", "hf"
EXPECTED = (
    "the original release's {split}.jsonl (with {split}.tables.jsonl beside it) or the Hugging Face "
    "export (.parquet or .jsonl with question, table, sql)"
)

_REF = re.compile(r'"((?:[^"]|"")*)"(?:#([0-9]+))?')
_STRING = re.compile(r"'((?:[^']|'')*)'")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?")
# dbengine.py's fallback for values it cannot parse as a number.
_FIRST_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")


# ---- the template and its SQL ----------------------------------------------------------------------


def _occurrences(header: list[str]):
    """(name, k) per column: the k-th column of that name."""
    seen: dict[str, int] = {}
    for name in header:
        seen[name] = seen.get(name, 0) + 1
        yield name, seen[name]


def column_refs(header: list[str]) -> list[str]:
    """How each column is named in the schema and the SQL: quoted, `#k` on a name's k-th repeat."""
    return ['"' + name.replace('"', '""') + '"' + (f"#{k}" if k > 1 else "") for name, k in _occurrences(header)]


def render_value(value) -> str:
    """A condition value as SQL text: quoted string, int, or float repr (see the module docstring)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"condition value {value!r}: expected a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"condition value {value!r}: not a finite number")
    return repr(value)


def render_sql(sql: dict, header: list[str]) -> str:
    """`{"sel", "agg", "conds": [[col, op, value], ...]}` as readable SQL over the columns of `header`."""
    refs = column_refs(header)
    column = refs[sql["sel"]]
    agg = AGG_OPS[sql["agg"]]
    text = f"SELECT {agg}({column}) FROM table" if agg else f"SELECT {column} FROM table"
    conds = [f"{refs[col]} {COND_OPS[op]} {render_value(value)}" for col, op, value in sql["conds"]]
    if conds:
        text += " WHERE " + " AND ".join(conds)
    return text


def sql_key(sql: dict) -> tuple:
    """`(sel, agg, conds)` with conds as a list of `(col, op, value)` tuples: what `parse_sql` returns."""
    return sql["sel"], sql["agg"], [tuple(c) for c in sql["conds"]]


class _Reader:
    """Left-to-right reading of one SQL string; every failure says where and what was expected."""

    def __init__(self, text: str, header: list[str]):
        self.text, self.pos = text, 0
        self.columns = {key: i for i, key in enumerate(_occurrences(header))}

    def fail(self, expected: str):
        raise ValueError(f"not WikiSQL SQL: expected {expected} at character {self.pos} of {self.text!r}")

    def accept(self, literal: str) -> bool:
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str):
        if not self.accept(literal):
            self.fail(repr(literal))

    def match(self, pattern: re.Pattern, expected: str) -> re.Match:
        m = pattern.match(self.text, self.pos)
        if m is None:
            self.fail(expected)
        self.pos = m.end()
        return m

    def column(self) -> int:
        start = self.pos
        m = self.match(_REF, "a quoted column name")
        key = (m.group(1).replace('""', '"'), int(m.group(2) or 1))
        if key not in self.columns:
            self.pos = start
            self.fail(f"a column of the table (no column {self.text[start : m.end()]})")
        return self.columns[key]

    def value(self):
        if self.text.startswith("'", self.pos):
            return self.match(_STRING, "a closing quote").group(1).replace("''", "'")
        number = self.match(_NUMBER, "a quoted string or a number").group(0)
        return float(number) if "." in number or "e" in number else int(number)


def parse_sql(text: str, header: list[str]) -> tuple:
    """Read SQL written by `render_sql` back to `(sel, agg, conds)`; ValueError if it is not such SQL.

    Surrounding whitespace is ignored; inside, the text must be exactly as `render_sql` writes it.
    """
    r = _Reader(text.strip(), header)
    r.expect("SELECT ")
    agg = next((i for i, op in enumerate(AGG_OPS) if op and r.accept(op + "(")), 0)
    sel = r.column()
    if agg:
        r.expect(")")
    r.expect(" FROM table")
    conds = []
    if r.accept(" WHERE "):
        while True:
            col = r.column()
            r.expect(" ")
            op = next((i for i, name in enumerate(COND_OPS) if r.accept(name + " ")), None)
            if op is None:
                r.fail(f"an operator ({', '.join(COND_OPS)})")
            conds.append((col, op, r.value()))
            if not r.accept(" AND "):
                break
    if r.pos != len(r.text):
        r.fail("the end of the query")
    return sel, agg, conds


def render_schema(header: list[str], types: list[str]) -> str:
    return " | ".join(f"{ref} ({kind})" for ref, kind in zip(column_refs(header), types))


def render(record: dict) -> tuple[str, str]:
    """(prompt, completion) of `{"question", "header", "types", "sql"}`."""
    prompt = TEMPLATE["prompt"].format(
        schema=render_schema(record["header"], record["types"]), question=record["question"]
    )
    return prompt, TEMPLATE["completion"].format(sql=render_sql(record["sql"], record["header"]))


def answer(record: dict) -> tuple:
    """The gold query, `(sel, agg, conds)`."""
    return sql_key(record["sql"])


def parse(prediction, record: dict) -> tuple | None:
    """(sel, agg, conds) of a prediction: SQL text in the task's template, or the official evaluator's
    `{"query": {...}, "error": ""}` record; None when it does not parse."""
    if isinstance(prediction, dict):
        if prediction.get("error") or not isinstance(prediction.get("query"), dict):
            return None
        q = prediction["query"]
        try:
            return int(q["sel"]), int(q["agg"]), [(int(c), int(o), v) for c, o, v in q["conds"]]
        except (KeyError, TypeError, ValueError):
            return None
    try:
        return parse_sql(prediction, record["header"])
    except ValueError:
        return None


# ---- reading the downloaded files ------------------------------------------------------------------


def tables_file(path: str) -> str:
    """The tables file of an original-release questions file: train.jsonl -> train.tables.jsonl."""
    return os.path.splitext(path)[0] + ".tables.jsonl"


def detect(path: str) -> tuple[str, list[str]]:
    """(format, files read) of a WikiSQL file."""
    name = os.path.basename(path)
    if name.endswith(".tables.jsonl"):
        raise UserError(
            f"--src {path}: this is a tables file; pass the questions file "
            f"{name[: -len('.tables.jsonl')]}.jsonl (its tables are read from beside it)"
        )
    if name.endswith(".parquet"):
        reading.check_columns(path, reading.parquet_columns(path), ("question", "table", "sql"), EXPECTED)
        return HF, [path]
    if name.endswith((".jsonl", ".json")):
        loc, first = reading.first_jsonl_record(path)
        if "table_id" in first:
            tables = tables_file(path)
            if not os.path.isfile(tables):
                raise UserError(
                    f"--src {path}: the original release's questions need their tables file {tables}; "
                    "put it beside the questions file"
                )
            return ORIGINAL, [path, tables]
        if "table" in first and "sql" in first:
            return HF, [path]
        raise UserError(f"{loc}: a record with fields {', '.join(sorted(first))}; expected {EXPECTED}")
    raise UserError(f"--src {path}: not a WikiSQL file; expected {EXPECTED}")


def read(path: str, fmt: str):
    """(Loc, record or BadRecord) per question; a record is {id, question, header, types, sql, table_id}."""
    if fmt == ORIGINAL:
        tables = load_tables(tables_file(path))
        for loc, raw in reading.read_jsonl(path):
            yield loc, attempt(_from_original, loc, raw, tables)
        return
    for loc, raw in reading.read_export(path):
        yield loc, attempt(_from_hf, loc, raw)


def load_tables(path: str, rows: bool = False) -> dict:
    """{table id: {header, types}} of a tables file, with their rows if `rows` (prep renders prompts only, so
    it does not keep them; evaluation executes queries); any bad line is an error."""
    tables = {}
    for loc, raw in reading.read_jsonl(path):
        try:
            if isinstance(raw, BadRecord):
                raise raw
            table_id = text(raw, "id", loc)
            header, types = _columns(raw, loc, "")
        except BadRecord as e:
            raise UserError(f"{e}; fix the tables file (--skip_bad does not apply to it)") from e
        if table_id in tables:
            raise UserError(f"{loc}: field 'id': table {table_id!r} appears twice; keep one of them")
        tables[table_id] = {"header": header, "types": types}
        if rows:
            if not isinstance(raw.get("rows"), list):
                raise UserError(f"{loc}: a table needs a list field 'rows' to execute queries; fix {path}")
            tables[table_id]["rows"] = raw["rows"]
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
    agg = index(
        field(sql, "agg", loc, (int,), "an integer", "sql.agg"),
        loc,
        "sql.agg",
        len(AGG_OPS),
        f"the aggregation list {list(AGG_OPS)}",
    )
    return sel, agg


def _cond(col, op, value, loc: Loc, names: list[str], header: list[str]) -> list:
    """[column, operator, value] checked; `names` are the three fields as the file calls them."""
    return [
        index(col, loc, names[0], len(header), "the header"),
        index(op, loc, names[1], len(COND_OPS), f"the operator list {list(COND_OPS)}"),
        _value(value, loc, names[2]),
    ]


def _from_original(loc: Loc, raw: dict, tables: dict) -> dict:
    if "table_id" not in raw and "table" in raw:
        raise reading.mixed(loc, "Hugging Face export's", "original release's")
    question = text(raw, "question", loc)
    table_id = text(raw, "table_id", loc)
    if table_id not in tables:
        raise BadRecord(f"{loc}: field 'table_id': no table {table_id!r} in the tables file")
    header, types = tables[table_id]["header"], tables[table_id]["types"]
    sql = field(raw, "sql", loc, (dict,), "an object")
    sel, agg = _sel_agg(sql, loc, header)
    conds = []
    for i, cond in enumerate(field(sql, "conds", loc, (list,), "a list", "sql.conds")):
        name = f"sql.conds[{i}]"
        if not isinstance(cond, list) or len(cond) != 3:
            raise BadRecord(f"{loc}: field '{name}' is {cond!r:.40}, expected [column, operator, value]")
        conds.append(_cond(*cond, loc, [f"{name}[{k}]" for k in range(3)], header))
    return {
        "id": loc.default_id,
        "question": question,
        "header": header,
        "types": types,
        "sql": {"sel": sel, "agg": agg, "conds": conds},
        "table_id": table_id,
    }


def _from_hf(loc: Loc, raw: dict) -> dict:
    if "table" not in raw and "table_id" in raw:
        raise reading.mixed(loc, "original release's", "Hugging Face export's")
    question = text(raw, "question", loc)
    header, types = _columns(field(raw, "table", loc, (dict,), "an object"), loc, "table.")
    sql = field(raw, "sql", loc, (dict,), "an object")
    sel, agg = _sel_agg(sql, loc, header)
    parts = field(sql, "conds", loc, (dict,), "an object of lists", "sql.conds")
    keys = ("column_index", "operator_index", "condition")
    lists = [field(parts, key, loc, (list,), "a list", f"sql.conds.{key}") for key in keys]
    if len({len(values) for values in lists}) > 1:
        raise BadRecord(
            f"{loc}: field 'sql.conds' has lists of different lengths "
            f"({', '.join(f'{k}: {len(v)}' for k, v in zip(keys, lists))})"
        )
    conds = [
        _cond(col, op, value, loc, [f"sql.conds.{key}[{i}]" for key in keys], header)
        for i, (col, op, value) in enumerate(zip(*lists))
    ]
    return {
        "id": loc.default_id,
        "question": question,
        "header": header,
        "types": types,
        "sql": {"sel": sel, "agg": agg, "conds": conds},
        "table_id": _table_id(raw["table"], loc),
    }


def _table_id(table: dict, loc: Loc) -> str:
    """An export's table id, or its question's file and line where it has none."""
    return str(table.get("id") or loc.default_id)


# ---- scoring ---------------------------------------------------------------------------------------


def logical_form_key(sel: int, agg: int, conds) -> tuple:
    """What the official evaluator compares: (sel, agg, {(col, op, str(value).lower())})."""
    return int(sel), int(agg), frozenset((int(c), int(o), str(v).lower()) for c, o, v in conds)


def _as_number(value):
    """A condition value against a real column, as dbengine.py reads it (babel's en_US parse_decimal, then the
    first number in the text); None when there is no number in it."""
    written = str(value)
    try:
        number = Decimal(written.replace(",", ""))
        if number.is_finite():
            return float(number)
    except InvalidOperation:
        pass
    found = _FIRST_NUMBER.findall(written)
    return float(found[0]) if found else None


class Tables:
    """The tables of a split in an in-memory sqlite3 database, built as the official `.db` files are:
    columns col0..colN typed text/real, text lowercased, real columns numeric."""

    def __init__(self, tables: dict):
        """`tables`: {table_id: {"header": [...], "types": [...], "rows": [[...], ...]}}."""
        self.db = sqlite3.connect(":memory:")
        self.types = {}
        for table_id, table in tables.items():
            types = [t if t == "real" else "text" for t in table["types"]]
            self.types[table_id] = types
            columns = ", ".join(f"col{i} {t}" for i, t in enumerate(types))
            self.db.execute(f"CREATE TABLE {self._name(table_id)} ({columns})")
            rows = [[self._cell(v, t) for v, t in zip(row, types)] for row in table["rows"]]
            if rows:
                marks = ", ".join("?" * len(types))
                self.db.executemany(f"INSERT INTO {self._name(table_id)} VALUES ({marks})", rows)

    @staticmethod
    def _name(table_id: str) -> str:
        return "table_" + re.sub(r"[^0-9A-Za-z_]", "_", table_id)

    @staticmethod
    def _cell(value, kind: str):
        if kind == "real":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            try:
                return float(str(value).replace(",", ""))
            except ValueError:
                pass  # a word in a real column stays text, as sqlite's REAL affinity keeps it
        return str(value).lower()

    def execute(self, table_id: str, sel: int, agg: int, conds) -> list:
        """Result list of the query; ValueError for a query the table cannot answer (bad column, value)."""
        if table_id not in self.types:
            raise ValueError(f"unknown table {table_id!r}")
        types = self.types[table_id]
        columns = [sel] + [c for c, _, _ in conds]
        if any(not isinstance(c, int) or not 0 <= c < len(types) for c in columns):
            raise ValueError(f"column index out of range for table {table_id!r} ({len(types)} columns)")
        if not 0 <= agg < len(AGG_OPS) or any(not 0 <= o < len(COND_OPS) for _, o, _ in conds):
            raise ValueError("aggregation or operator index out of range")
        select = f"{AGG_OPS[agg]}(col{sel})" if agg else f"col{sel}"
        where, params = [], {}
        for col, op, value in conds:
            if isinstance(value, str):
                value = value.lower()
            if types[col] == "real" and not isinstance(value, (int, float)):
                number = _as_number(value)
                if number is None:
                    raise ValueError(f"value {value!r} is not a number (column {col} is real)")
                value = number
            # As dbengine.py: one named parameter per column, so a repeated column keeps its last value.
            where.append(f"col{col} {COND_OPS[op]} :col{col}")
            params[f"col{col}"] = value
        query = f"SELECT {select} AS result FROM {self._name(table_id)}"
        if where:
            query += " WHERE " + " AND ".join(where)
        try:
            return [row[0] for row in self.db.execute(query, params)]
        except sqlite3.Error as e:
            raise ValueError(f"sqlite: {e}") from e


def eval_context(sources: list[tuple[str, str]]) -> Tables:
    """The tables of the questions in `sources` ((path, format) per file), with their rows, to execute queries."""
    tables = {}
    for path, fmt in sources:
        tables.update(load_tables(tables_file(path), rows=True) if fmt == ORIGINAL else _export_tables(path))
    return Tables(tables)


def _export_tables(path: str) -> dict:
    """{table id: {header, types, rows}} of the questions of a Hugging Face export."""
    tables = {}
    for loc, raw in reading.read_export(path):
        table = raw.get("table") if isinstance(raw, dict) else None
        if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
            raise UserError(f"{loc}: field 'table.rows' is missing; execution accuracy needs the table's rows")
        tables[_table_id(table, loc)] = {"header": table["header"], "types": table["types"], "rows": table["rows"]}
    return tables


def score_example(prediction, record: dict, tables: Tables, choice=None) -> dict:
    """{"parsed", "lf", "ex", "gold_executes"} (1/0) of one prediction (SQL text or an official-format line)
    against `record`. A gold query the table cannot answer (the official evaluator would stop) counts as
    wrong for execution and is reported."""
    gold_q = answer(record)
    try:
        gold_result, gold_executes = tables.execute(record["table_id"], *gold_q), 1
    except ValueError:
        gold_result, gold_executes = None, 0
    pred_q = parse(prediction, record)
    if pred_q is None:
        return {"parsed": 0, "lf": 0, "ex": 0, "gold_executes": gold_executes}
    lf = int(logical_form_key(*pred_q) == logical_form_key(*gold_q))
    try:
        ex = int(gold_executes and tables.execute(record["table_id"], *pred_q) == gold_result)
    except ValueError:
        ex = 0
    return {"parsed": 1, "lf": lf, "ex": ex, "gold_executes": gold_executes}


def aggregate(scores: list[dict], tables: Tables) -> dict:
    """A split's accuracies (%) and counts."""
    n = len(scores)
    return {
        "n": n,
        "lf_accuracy": 100.0 * sum(s["lf"] for s in scores) / n,
        "ex_accuracy": 100.0 * sum(s["ex"] for s in scores) / n,
        "unparsed": sum(1 - s["parsed"] for s in scores),
        "gold_exec_errors": sum(1 - s["gold_executes"] for s in scores),
    }


# ---- the official evaluator's predictions format ---------------------------------------------------


class OfficialFormat:
    """salesforce/WikiSQL `evaluate.py`'s predictions: one line per line of the questions file, in order,
    `{"query": {"sel", "agg", "conds"}, "error": ""}`. Read by `lora-ds score`, written by eval and score
    beside predictions.jsonl."""

    FILE = "predictions.official.jsonl"
    HINT = 'the official WikiSQL format {"query": ..., "error": ""}'

    @staticmethod
    def recognizes(line: dict) -> bool:
        """Whether a predictions file's first line is in this format."""
        return "query" in line or ("error" in line and "prediction" not in line)

    @staticmethod
    def read(path: str, lines: list[tuple[int, dict]], n_questions: int) -> list[dict]:
        """The lines of a predictions file in this format, checked against the number of questions."""
        if len(lines) != n_questions:
            raise UserError(
                f"{path}: {len(lines)} lines in the official WikiSQL format, but --data has "
                f"{n_questions} questions; the format needs one line per source line, in order"
            )
        for lineno, line in lines:
            if not isinstance(line.get("query"), dict) and not line.get("error"):
                raise UserError(f'{path}:{lineno}: expected {{"query": {{"sel", "agg", "conds"}}, "error": ""}}')
        return [line for _, line in lines]

    @staticmethod
    def line(prediction: str, record: dict) -> dict:
        """A text prediction in this format."""
        try:
            sel, agg, conds = parse_sql(prediction, record["header"])
        except ValueError as e:
            return {"query": {}, "error": str(e)}
        return {"query": {"sel": sel, "agg": agg, "conds": [list(c) for c in conds]}, "error": ""}


OFFICIAL = OfficialFormat()
