"""The paper's metrics, one scorer per task, over predicted text (or WikiSQL queries) and gold records.

WikiSQL follows the official evaluator (salesforce/WikiSQL `evaluate.py`, `lib/query.py`, `lib/dbengine.py`):
  logical form   sel, agg and the *set* of conditions equal, each condition as (col, op, str(value).lower()),
                 so a string '3' equals the number 3, but 3 and 3.0 differ (as in the official Query.__eq__);
  execution      both queries run with sqlite3 on the table (text lowercased, real columns numeric), string
                 values lowercased, a non-numeric value compared with a real column read as a number (commas
                 dropped, else its first number); the result lists must be equal.
A prediction that does not parse is wrong for both and counted under `unparsed`; a gold query that does not
execute (the official evaluator would stop) is wrong for execution and counted under `gold_exec_errors`.

MNLI: accuracy per split of the constrained choice (highest-likelihood label word) and of free generation.
SAMSum: ROUGE F1 × 100 (mean over examples) from the `rouge-score` package with its Porter stemmer;
rouge1/2/L see the text as one sequence, rougeLsum is summary-level LCS over sentences split by NLTK's
Punkt (its trained English model when installed, else the untrained algorithm; the report names which).
"""
from __future__ import annotations

import re
import sqlite3
from decimal import Decimal, InvalidOperation

from lora_ds.errors import UserError
from lora_ds.tasks.mnli import parse_label
from lora_ds.tasks.wikisql import AGG_OPS, COND_OPS, parse_sql

# dbengine.py's fallback for values it cannot parse as a number.
_FIRST_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_NOTE = ("ROUGE F1 x100 (mean over examples), rouge-score package, Porter stemming on; rouge1/rouge2/rougeL "
              "over the whole text, rougeLsum summary-level LCS over sentences")


# ---- WikiSQL -------------------------------------------------------------------------------------------------

def logical_form_key(sel: int, agg: int, conds) -> tuple:
    """What the official evaluator compares: (sel, agg, {(col, op, str(value).lower())})."""
    return int(sel), int(agg), frozenset((int(c), int(o), str(v).lower()) for c, o, v in conds)


def _as_number(value):
    """A condition value against a real column, as dbengine.py reads it (babel's en_US parse_decimal, then the
    first number in the text); None when there is no number in it."""
    text = str(value)
    try:
        number = Decimal(text.replace(",", ""))
        if number.is_finite():
            return float(number)
    except InvalidOperation:
        pass
    found = _FIRST_NUMBER.findall(text)
    return float(found[0]) if found else None


class WikiSQLTables:
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


def parse_wikisql_prediction(prediction, header: list[str]):
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
        return parse_sql(prediction, header)
    except ValueError:
        return None


def score_wikisql_example(prediction, gold: dict, tables: WikiSQLTables) -> dict:
    """{"parsed", "lf", "ex", "gold_executes"} (1/0) of one prediction against `gold` ({"sql", "header",
    "table_id"}). A gold query the table cannot answer (the official evaluator would stop) counts as wrong
    for execution and is reported."""
    sql = gold["sql"]
    gold_q = (sql["sel"], sql["agg"], [tuple(c) for c in sql["conds"]])
    try:
        gold_result, gold_executes = tables.execute(gold["table_id"], *gold_q), 1
    except ValueError:
        gold_result, gold_executes = None, 0
    pred_q = parse_wikisql_prediction(prediction, gold["header"])
    if pred_q is None:
        return {"parsed": 0, "lf": 0, "ex": 0, "gold_executes": gold_executes}
    lf = int(logical_form_key(*pred_q) == logical_form_key(*gold_q))
    try:
        ex = int(gold_executes and tables.execute(gold["table_id"], *pred_q) == gold_result)
    except ValueError:
        ex = 0
    return {"parsed": 1, "lf": lf, "ex": ex, "gold_executes": gold_executes}


def aggregate_wikisql(scores: list[dict]) -> dict:
    n = len(scores)
    return {"n": n, "lf_accuracy": 100.0 * sum(s["lf"] for s in scores) / n,
            "ex_accuracy": 100.0 * sum(s["ex"] for s in scores) / n, "unparsed": sum(1 - s["parsed"] for s in scores),
            "gold_exec_errors": sum(1 - s["gold_executes"] for s in scores)}


# ---- MNLI ----------------------------------------------------------------------------------------------------

def score_mnli_example(generated: str, label: str, constrained: str | None = None) -> dict:
    """{"generated_label", "generated", "constrained"?}: 1/0 per way of predicting."""
    word = parse_label(generated)
    score = {"generated_label": word, "generated": int(word == label)}
    if constrained is not None:
        score["constrained"] = int(constrained == label)
    return score


def aggregate_mnli(scores: list[dict]) -> dict:
    n = len(scores)
    out = {"n": n, "accuracy_generated": 100.0 * sum(s["generated"] for s in scores) / n,
           "unparsed_generated": sum(s["generated_label"] is None for s in scores)}
    if all("constrained" in s for s in scores):
        out["accuracy_constrained"] = 100.0 * sum(s["constrained"] for s in scores) / n
    return out


# ---- SAMSum --------------------------------------------------------------------------------------------------

# Titles and times that end in a period without ending a sentence; the trained Punkt model knows them, the
# untrained one needs them listed.
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "a.m", "p.m"}


def sentence_splitter():
    """(split function, its description): NLTK's trained English Punkt model when its data is installed,
    else the Punkt algorithm with default parameters plus ABBREVIATIONS (no download needed)."""
    import nltk
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return nltk.sent_tokenize, "nltk.sent_tokenize (trained English Punkt)"
    except LookupError:
        params = PunktParameters()
        params.abbrev_types = set(ABBREVIATIONS)
        return PunktSentenceTokenizer(params).tokenize, "NLTK Punkt, untrained, with a list of 14 abbreviations"


class Rouge:
    """ROUGE-1/2/L/Lsum F1 x 100 per example (see the module docstring for the exact settings)."""

    def __init__(self):
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise UserError("SAMSum scoring needs the rouge-score package: pip install rouge-score") from e
        self.scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        self.split, splitter = sentence_splitter()
        self.note = f"{ROUGE_NOTE}; sentence splitter: {splitter}"

    def sentences(self, text: str) -> str:
        """`text` with one sentence per line: what rougeLsum reads as its sentence boundaries."""
        return "\n".join(s for line in text.splitlines() for s in self.split(line))

    def __call__(self, prediction: str, reference: str) -> dict:
        # Newlines separate tokens like spaces do for rouge1/2/L, so one call scores all four.
        result = self.scorer.score(self.sentences(reference), self.sentences(prediction))
        return {k: 100.0 * result[k].fmeasure for k in ROUGE_TYPES}


def aggregate_rouge(scores: list[dict], note: str = ROUGE_NOTE) -> dict:
    n = len(scores)
    out = {"n": n, "note": note}
    for k in ROUGE_TYPES:
        out[k] = sum(s[k] for s in scores) / n
    return out
