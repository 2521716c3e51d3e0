"""The paper's metrics on fixtures with known answers: perfect = 100, fixed wrong = 0, hand-checked partials."""

from __future__ import annotations

import json

import pytest
from fixtures import FIXTURES, SAMSUM, TABLE, write_fixture, write_mnli, write_samsum

from lora_ds.errors import UserError
from lora_ds.evaluation import load_eval_set, read_predictions, score, split_name, write_outputs
from lora_ds.tasks import get_task, samsum
from lora_ds.tasks import wikisql as sql_task

WRONG_SQL = 'SELECT "Years" FROM table WHERE "Player" = \'Bob Jones\''  # ['1993']: no gold query gives it


@pytest.fixture(scope="module")
def wikisql(wikisql_file):
    return load_eval_set("wikisql", [str(wikisql_file)])


def test_wikisql_prompts_are_the_task_template_and_ids_are_file_lines(wikisql):
    first = wikisql.examples[0]
    assert first.id == "dev.jsonl:1" and first.split == "dev" and wikisql.source_lines == 5
    assert first.prompt == (
        'Table: "Player" (text) | "No." (real) | "Position" (text) | "Years" (text) | '
        '"Goals" (real)\nQuestion: What position does Alan Smith play?\nSQL:'
    )
    assert first.reference == 'SELECT "Position" FROM table WHERE "Player" = \'Alan Smith\''
    assert wikisql.examples[1].reference == 'SELECT "Goals" FROM table WHERE "No." = 3'


def test_wikisql_perfect_predictions_score_100_and_wrong_ones_0(wikisql):
    _, perfect = score(wikisql, [e.reference for e in wikisql.examples])
    assert perfect["dev"] == {"n": 5, "lf_accuracy": 100.0, "ex_accuracy": 100.0, "unparsed": 0, "gold_exec_errors": 0}
    _, wrong = score(wikisql, [WRONG_SQL] * 5)
    assert wrong["dev"] == {"n": 5, "lf_accuracy": 0.0, "ex_accuracy": 0.0, "unparsed": 0, "gold_exec_errors": 0}


def test_wikisql_hand_checked_partial_cases(wikisql):
    predictions = [
        'SELECT "Position" FROM table WHERE "Player" = \'alan smith\'',  # values compared lowercased: both
        'SELECT "Goals" FROM table WHERE "No." = 3.0',  # 3.0 vs gold 3: execution only
        'SELECT "Player" FROM table WHERE "No." = 10 AND "Position" = \'Forward\'',  # conds reordered: both
        'SELECT "No." FROM table WHERE "Player" = \'Carl Brown\'',  # other column, same [10]: ex only
        "SELECT COUNT(Player) FROM table",  # unquoted column: does not parse
    ]
    rows, by_split = score(wikisql, predictions)
    assert [(r["score"]["lf"], r["score"]["ex"]) for r in rows] == [(1, 1), (0, 1), (1, 1), (0, 1), (0, 0)]
    assert by_split["dev"] == {"n": 5, "lf_accuracy": 40.0, "ex_accuracy": 80.0, "unparsed": 1, "gold_exec_errors": 0}
    assert rows[4]["score"]["parsed"] == 0


def test_wikisql_string_3_equals_number_3_for_both_metrics(wikisql):
    gold = wikisql.examples[1].record  # "No." = 3 (a JSON number in the source)
    s = sql_task.score_example('SELECT "Goals" FROM table WHERE "No." = \'3\'', gold, wikisql.context)
    assert s == {"parsed": 1, "lf": 1, "ex": 1, "gold_executes": 1}


def test_wikisql_execution_follows_the_official_engine():
    tables = sql_task.Tables({"t": TABLE})
    assert tables.execute("t", 2, 0, [(0, 0, "ALAN SMITH")]) == ["forward"]  # text lowercased on both sides
    assert tables.execute("t", 4, 1, [(2, 0, "forward")]) == [12]  # MAX over a real column
    assert tables.execute("t", 0, 3, [(4, 1, "3.5 goals")]) == [3]  # a real compared by its first number
    assert tables.execute("t", 0, 0, [(1, 2, "1,000")]) == ["alan smith", "bob jones", "carl brown"]
    with pytest.raises(ValueError, match="out of range"):
        tables.execute("t", 9, 0, [])
    with pytest.raises(ValueError, match="not a number"):
        tables.execute("t", 0, 0, [(1, 0, "many")])


def test_wikisql_official_prediction_format_is_scored_by_line(wikisql, tmp_path):
    lines = [
        {"query": {"sel": 2, "agg": 0, "conds": [[0, 0, "Alan Smith"]]}, "error": ""},
        {"query": {"sel": 4, "agg": 0, "conds": [[1, 0, 3.0]]}, "error": ""},
        {"query": {}, "error": "could not parse"},
        {"query": {"sel": 1, "agg": 0, "conds": [[0, 0, "Carl Brown"]]}, "error": ""},
        {"query": {"sel": 0, "agg": 3, "conds": [[2, 0, "Forward"]]}, "error": ""},
    ]
    path = tmp_path / "official.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    predictions, constrained = read_predictions(str(path), wikisql)
    assert constrained is None
    rows, by_split = score(wikisql, predictions)
    assert [(r["score"]["lf"], r["score"]["ex"]) for r in rows] == [(1, 1), (0, 1), (0, 0), (0, 1), (1, 1)]
    assert by_split["dev"] == {"n": 5, "lf_accuracy": 40.0, "ex_accuracy": 80.0, "unparsed": 1, "gold_exec_errors": 0}
    path.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(UserError, match="1 lines in the official WikiSQL format, but --data has 5 questions"):
        read_predictions(str(path), wikisql)


def test_mnli_reads_matched_and_mismatched_and_drops_no_majority(tmp_path):
    evalset = load_eval_set("mnli", [str(p) for p in write_mnli(tmp_path)])
    assert [(e.split, e.id) for e in evalset.examples] == [
        ("matched", "m1"),
        ("matched", "m2"),
        ("matched", "m3"),
        ("matched", "m4"),
        ("mismatched", "x1"),
        ("mismatched", "x2"),
        ("mismatched", "x3"),
    ]
    assert evalset.examples[0].prompt == "Premise: A man is playing a guitar.\nHypothesis: A man plays music.\nLabel:"
    assert split_name("validation_mismatched-00000-of-00001.parquet", "mnli") == "mismatched"


def test_mnli_accuracy_of_both_ways_of_predicting(tmp_path):
    evalset = load_eval_set("mnli", [str(p) for p in write_mnli(tmp_path)])
    gold = [e.reference for e in evalset.examples]
    _, perfect = score(evalset, gold, constrained=gold)
    for split, n in (("matched", 4), ("mismatched", 3)):
        assert perfect[split] == {
            "n": n,
            "accuracy_generated": 100.0,
            "accuracy_constrained": 100.0,
            "unparsed_generated": 0,
        }
    wrong = {"entailment": "neutral", "neutral": "contradiction", "contradiction": "entailment"}
    _, zero = score(evalset, [wrong[g] for g in gold], constrained=[wrong[g] for g in gold])
    assert zero["matched"]["accuracy_generated"] == 0.0 and zero["mismatched"]["accuracy_constrained"] == 0.0
    # matched: right, "Entailment" (not a label word as generated), right, wrong; constrained all right.
    generated = ["entailment", "Contradiction", "neutral", "neutral", "entailment", "maybe", "contradiction"]
    rows, partial = score(evalset, generated, constrained=gold)
    assert partial["matched"] == {
        "n": 4,
        "accuracy_generated": 50.0,
        "accuracy_constrained": 100.0,
        "unparsed_generated": 1,
    }
    assert partial["mismatched"]["accuracy_generated"] == pytest.approx(200 / 3)
    assert rows[1]["constrained"] == "contradiction" and rows[1]["score"]["generated_label"] is None


def test_samsum_rouge_perfect_wrong_and_hand_checked(tmp_path):
    evalset = load_eval_set("samsum", [str(write_samsum(tmp_path))])
    assert evalset.examples[0].prompt == "Anna: Are you coming?\nTom: Yes, in 10 minutes.\n\n"
    _, perfect = score(evalset, [s["summary"] for s in SAMSUM])
    assert {k: perfect["val"][k] for k in samsum.ROUGE_TYPES} == dict.fromkeys(samsum.ROUGE_TYPES, 100.0)
    assert "stemming on" in perfect["val"]["note"] and "sentence splitter" in perfect["val"]["note"]
    _, zero = score(evalset, ["Nothing relevant here."] * 3)
    assert {k: zero["val"][k] for k in samsum.ROUGE_TYPES} == dict.fromkeys(samsum.ROUGE_TYPES, 0.0)
    rows, _ = score(evalset, ["Tom comes in ten minutes.", "John bought pears.", "Tom is late. Anna calls Tom."])
    # s2: unigrams john, bought (of 3 predicted, 6 reference): F = 2·(2/3)(1/3)/(2/3 + 1/3) = 4/9.
    # Bigram "john bought" of 2 and 5: F = 2·(1/2)(1/5)/(7/10) = 2/7.
    assert rows[1]["score"] == pytest.approx(
        {"rouge1": 400 / 9, "rouge2": 200 / 7, "rougeL": 400 / 9, "rougeLsum": 400 / 9}
    )
    # s3: the same sentences in the other order; "calls" stems to "call". The LCS of the whole text is 3 of
    # 6 tokens (rougeL 50), but each reference sentence is matched whole by one predicted sentence (Lsum 100).
    assert rows[2]["score"] == pytest.approx({"rouge1": 100.0, "rouge2": 80.0, "rougeL": 50.0, "rougeLsum": 100.0})
    # s1: tom, come, in, minut of 5 predicted and 6 reference tokens ("comes" and "coming" stem alike, "ten"
    # is not "10"): F = 2·4/(5 + 6) = 8/11.
    assert rows[0]["score"]["rouge1"] == pytest.approx(800 / 11)


def test_sentence_splitting_keeps_titles_and_times():
    rouge = samsum.Rouge()
    assert (
        rouge.sentences("Mr. Smith comes at 5 p.m. today. He is late!")
        == "Mr. Smith comes at 5 p.m. today.\nHe is late!"
    )


def test_predictions_by_id_need_every_example(tmp_path, wikisql):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "dev.jsonl:1", "prediction": "x"}) + "\n")
    with pytest.raises(UserError, match="no prediction for id 'dev.jsonl:2'"):
        read_predictions(str(path), wikisql)
    path.write_text(json.dumps({"id": "dev.jsonl:1", "text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:1: each line needs 'id' and 'prediction'"):
        read_predictions(str(path), wikisql)


@pytest.mark.parametrize("name,task", sorted(FIXTURES.items()))
def test_every_download_format_is_read_and_reference_predictions_score_full_marks(name, task, tmp_path):
    evalset = load_eval_set(task, [str(p) for p in write_fixture(name, tmp_path)])
    gold = [e.reference for e in evalset.examples]
    _, by_split = score(evalset, gold, constrained=gold if get_task(task).CHOICES else None)
    (values,) = by_split.values()
    assert set(get_task(task).TABLE_COLUMNS) <= set(values)
    if task == "wikisql":
        # The synthetic tables put words in real columns: such gold queries cannot execute, as in the official
        # evaluator, and count against execution accuracy only (the same 10 of 40 in every format).
        assert values["lf_accuracy"] == 100.0 and values["unparsed"] == 0 and values["gold_exec_errors"] == 10
        assert values["ex_accuracy"] == 100.0 * (values["n"] - 10) / values["n"] == 75.0
    elif task == "mnli":
        assert values["accuracy_generated"] == values["accuracy_constrained"] == 100.0
    else:
        assert [values[k] for k in samsum.ROUGE_TYPES] == [100.0] * 4


@pytest.mark.parametrize("name,task", sorted(FIXTURES.items()))
def test_written_predictions_read_back_to_the_same_metrics(name, task, tmp_path):
    evalset = load_eval_set(task, [str(p) for p in write_fixture(name, tmp_path / "data")])
    predictions = [e.reference if i % 3 else "?" for i, e in enumerate(evalset.examples)]
    constrained = [e.reference for e in evalset.examples] if get_task(task).CHOICES else None
    rows, by_split = score(evalset, predictions, constrained)
    write_outputs(str(tmp_path / "out"), evalset, rows, {"task": task, "metrics": by_split})
    official = get_task(task).OFFICIAL
    for written in ["predictions.jsonl"] + ([official.FILE] if official else []):
        again, choices = read_predictions(str(tmp_path / "out" / written), evalset)
        assert score(evalset, again, choices)[1] == by_split, written
