"""WikiSQL (Zhong et al. 2017): table schema + question in, SQL out.

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
"""
from __future__ import annotations

import math
import re

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

_REF = re.compile(r'"((?:[^"]|"")*)"(?:#([0-9]+))?')
_STRING = re.compile(r"'((?:[^']|'')*)'")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?")


def column_refs(header: list[str]) -> list[str]:
    """How each column is named in the schema and the SQL: quoted, `#k` on a name's k-th repeat."""
    seen: dict[str, int] = {}
    refs = []
    for name in header:
        seen[name] = seen.get(name, 0) + 1
        ref = '"' + name.replace('"', '""') + '"'
        refs.append(ref if seen[name] == 1 else f"{ref}#{seen[name]}")
    return refs


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
        self.columns = {}
        seen: dict[str, int] = {}
        for i, name in enumerate(header):
            seen[name] = seen.get(name, 0) + 1
            self.columns[(name, seen[name])] = i

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
            self.fail(f"a column of the table (no column {self.text[start:m.end()]})")
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
    prompt = TEMPLATE["prompt"].format(schema=render_schema(record["header"], record["types"]),
                                       question=record["question"])
    return prompt, TEMPLATE["completion"].format(sql=render_sql(record["sql"], record["header"]))
