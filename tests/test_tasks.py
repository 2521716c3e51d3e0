"""The task modules: every task has the whole interface, reads every download format, and parses its own
rendered answers back; WikiSQL SQL renders and parses back exactly; MNLI and SAMSum render as the paper's."""

from __future__ import annotations

import pytest
from fixtures import FIXTURES, wikisql_data, wikisql_hf_rows, write_fixture

from lora_ds.tasks import TASKS, get_task, mnli, samsum, wikisql
from lora_ds.tasks.reading import BadRecord


def typed(conds):
    """Conditions with each value's type, since 3 == 3.0 in Python but not in the SQL text."""
    return [(col, op, type(value), value) for col, op, value in conds]


def assert_round_trip(sql: dict, header: list[str]):
    text = wikisql.render_sql(sql, header)
    sel, agg, conds = wikisql.parse_sql(text, header)
    want_sel, want_agg, want_conds = wikisql.sql_key(sql)
    assert (sel, agg, typed(conds)) == (want_sel, want_agg, typed(want_conds)), text


@pytest.mark.parametrize("name", ["wikisql-original", "wikisql-hf-parquet", "wikisql-hf-jsonl"])
def test_every_fixture_query_parses_back_to_its_sql(name, tmp_path):
    [src] = write_fixture(name, tmp_path)
    fmt, _ = wikisql.detect(str(src))
    records = [record for _, record in wikisql.read(str(src), fmt)]
    assert len(records) == 40
    for record in records:
        assert_round_trip(record["sql"], record["header"])


def test_generated_queries_parse_back_at_scale():
    tables, questions = wikisql_data(1000)
    by_id = {t["id"]: t for t in tables}
    for q in questions:
        assert_round_trip(q["sql"], by_id[q["table_id"]]["header"])
    for row in wikisql_hf_rows(1000):
        conds = row["sql"]["conds"]
        sql = {
            "sel": row["sql"]["sel"],
            "agg": row["sql"]["agg"],
            "conds": list(zip(conds["column_index"], conds["operator_index"], conds["condition"])),
        }
        assert_round_trip(sql, row["table"]["header"])


def test_sql_names_columns_and_quotes_values():
    header = ["Player", "No.", 'Team "Club"', "Score", "Score", "Coach's name"]
    sql = {"sel": 4, "agg": 1, "conds": [[2, 0, "O'Brien"], [1, 1, 3], [3, 2, 3.0], [5, 3, "3"]]}
    text = wikisql.render_sql(sql, header)
    assert text == (
        'SELECT MAX("Score"#2) FROM table WHERE "Team ""Club""" = \'O\'\'Brien\' AND "No." > 3 '
        'AND "Score" < 3.0 AND "Coach\'s name" OP \'3\''
    )
    assert_round_trip(sql, header)
    assert wikisql.parse_sql(f"  {text}\n", header)[0] == 4
    assert wikisql.render_sql({"sel": 0, "agg": 0, "conds": []}, header) == 'SELECT "Player" FROM table'


@pytest.mark.parametrize(
    "value, text",
    [
        (3, "3"),
        (3.0, "3.0"),
        (-4, "-4"),
        (2.5, "2.5"),
        (1e16, "1e+16"),
        (1.5e-07, "1.5e-07"),
        ("3", "'3'"),
        ("", "''"),
        ("a'b", "'a''b'"),
    ],
)
def test_numbers_keep_their_type(value, text):
    assert wikisql.render_value(value) == text
    sql = {"sel": 0, "agg": 0, "conds": [[0, 0, value]]}
    assert_round_trip(sql, ["c"])


@pytest.mark.parametrize("value", [True, None, float("nan"), float("inf"), [1]])
def test_non_values_are_refused(value):
    with pytest.raises((TypeError, ValueError)):
        wikisql.render_value(value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SELECT Player FROM table",
        'SELECT "Nope" FROM table',
        'SELECT MAX("Player" FROM table',
        'SELECT "Player" FROM table WHERE',
        'SELECT "Player" FROM table WHERE "Player" != 3',
        'SELECT "Player" FROM table WHERE "Player" = \'open',
        'SELECT "Player" FROM table LIMIT 1',
        'SELECT "Player"#3 FROM table',
        'SELECT "Player" FROM table WHERE "Player" = 3 AND',
    ],
)
def test_malformed_sql_is_a_value_error(text):
    with pytest.raises(ValueError, match="not WikiSQL SQL"):
        wikisql.parse_sql(text, ["Player", "Player"])


def test_wikisql_prompt_is_schema_then_question():
    record = {
        "question": "Who scored?",
        "header": ["Player", "Goals"],
        "types": ["text", "real"],
        "sql": {"sel": 0, "agg": 0, "conds": [[1, 1, 10]]},
    }
    prompt, completion = wikisql.render(record)
    assert prompt == 'Table: "Player" (text) | "Goals" (real)\nQuestion: Who scored?\nSQL:'
    assert completion == ' SELECT "Player" FROM table WHERE "Goals" > 10'


def test_mnli_target_is_the_label_word():
    prompt, completion = mnli.render({"premise": 'He said "no.', "hypothesis": "He spoke.", "label": "neutral"})
    assert prompt == 'Premise: He said "no.\nHypothesis: He spoke.\nLabel:' and completion == " neutral"
    assert mnli.LABELS == ("entailment", "neutral", "contradiction")
    assert [mnli.parse(f" {w}\n", {}) for w in mnli.LABELS] == list(mnli.LABELS)
    assert mnli.parse(" maybe", {}) is None


def test_samsum_joins_utterances_by_newline_then_blank_line():
    dialogue = 'Amanda: cookies?\r\nJerry: Sure, "yes"!\n\nAmanda: ok \r\r\n'
    prompt, completion = samsum.render({"dialogue": dialogue, "summary": "Amanda\r\nbakes."})
    assert samsum.utterances(dialogue) == ["Amanda: cookies?", 'Jerry: Sure, "yes"!', "Amanda: ok "]
    assert prompt == 'Amanda: cookies?\nJerry: Sure, "yes"!\nAmanda: ok \n\n'
    assert completion == "Amanda\r\nbakes."


@pytest.mark.parametrize("name", TASKS)
def test_each_task_has_one_versioned_template(name):
    task = get_task(name)
    assert task.NAME == name and task.TEMPLATE["name"] == name and task.TEMPLATE["version"] >= 1
    assert {"prompt", "completion"} <= set(task.TEMPLATE)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("squad")


# ---- every task in the registry ------------------------------------------------------------------------------

INTERFACE = {"NAME": str, "TEMPLATE": dict, "TABLE_COLUMNS": tuple, "MAX_NEW_TOKENS": int, "SPLIT_NAMES": tuple}
FUNCTIONS = ("detect", "read", "render", "answer", "parse", "eval_context", "score_example", "aggregate")


@pytest.mark.parametrize("name", TASKS)
def test_each_task_module_has_the_whole_interface(name):
    task = get_task(name)
    for attr, kind in INTERFACE.items():
        assert isinstance(getattr(task, attr), kind), attr
    assert all(callable(getattr(task, f)) for f in FUNCTIONS)
    assert task.TABLE_COLUMNS[0] == "n" and task.MAX_NEW_TOKENS >= 1
    assert task.CHOICES is None or all(isinstance(c, str) for c in task.CHOICES.values())
    assert task.OFFICIAL is None or all(
        hasattr(task.OFFICIAL, a) for a in ("FILE", "HINT", "recognizes", "read", "line")
    )
    assert any(t == name for t in FIXTURES.values()), f"add {name}'s download formats to tests/fixtures.py"


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_format_is_read_and_each_reference_parses_back_to_its_answer(name, tmp_path):
    task = get_task(FIXTURES[name])
    for path in map(str, write_fixture(name, tmp_path)):
        fmt, files = task.detect(path)
        assert path in files
        records = [record for _, record in task.read(path, fmt) if record is not None]
        assert len(records) >= 30
        for record in records:
            assert not isinstance(record, BadRecord), record
            prompt, completion = task.render(record)
            assert prompt and completion.strip() and isinstance(record["id"], str)
            assert task.parse(completion.strip(), record) == task.answer(record)
            if task.CHOICES is not None:
                assert task.CHOICES[task.answer(record)] == completion
