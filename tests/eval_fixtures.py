"""Small task files in the real download formats, with known answers, for the evaluation tests.

    write_wikisql(tmp_path)   dev.jsonl + dev.tables.jsonl (the original release's layout)
    write_mnli(tmp_path)      dev_matched.tsv + dev_mismatched.tsv (GLUE's TSV)
    write_samsum(tmp_path)    val.json (the corpus release's JSON list)
"""
from __future__ import annotations

import json
from pathlib import Path

TABLE = {
    "id": "1-1000-1",
    "header": ["Player", "No.", "Position", "Years", "Goals"],
    "types": ["text", "real", "text", "text", "real"],
    "rows": [["Alan Smith", 3, "Forward", "1990-1995", 12],
             ["Bob Jones", 7, "Defender", "1993", 4],
             ["Carl Brown", 10, "Forward", "1996-2000", 10]],
}
# (question, sql) with sql as the original release writes it: a condition value may be a JSON number.
WIKISQL = [
    ("What position does Alan Smith play?", {"sel": 2, "agg": 0, "conds": [[0, 0, "Alan Smith"]]}),
    ("How many goals did number 3 score?", {"sel": 4, "agg": 0, "conds": [[1, 0, 3]]}),
    ("Which forward wore number 10?", {"sel": 0, "agg": 0, "conds": [[2, 0, "Forward"], [1, 0, 10]]}),
    ("How many goals did Carl Brown score?", {"sel": 4, "agg": 0, "conds": [[0, 0, "Carl Brown"]]}),
    ("How many players are forwards?", {"sel": 0, "agg": 3, "conds": [[2, 0, "Forward"]]}),
]

MNLI_MATCHED = [  # (pairID, genre, sentence1, sentence2, gold_label)
    ("m1", "fiction", "A man is playing a guitar.", "A man plays music.", "entailment"),
    ("m2", "travel", "The hotel is by the sea.", "The hotel is in the mountains.", "contradiction"),
    ("m3", "slate", "She went to the market.", "She bought apples.", "neutral"),
    ("m4", "government", "The office opens at nine.", "The office opens in the morning.", "entailment"),
    ("m5", "telephone", "We talked for an hour.", "We never spoke.", "-"),
]
MNLI_MISMATCHED = [
    ("x1", "letters", "Thank you for your gift.", "The writer received a gift.", "entailment"),
    ("x2", "oup", "The book has ten chapters.", "The book is short.", "neutral"),
    ("x3", "verbatim", "It rained all day.", "The day was dry.", "contradiction"),
]

SAMSUM = [
    {"id": "s1", "dialogue": "Anna: Are you coming?\r\nTom: Yes, in 10 minutes.", "summary":
        "Tom is coming in 10 minutes."},
    {"id": "s2", "dialogue": "John: I bought apples.\nMary: I ate them!", "summary":
        "John bought apples. Mary ate them."},
    {"id": "s3", "dialogue": "Anna: Call Tom.\nBen: He is late.", "summary": "Anna calls Tom. Tom is late."},
]


def write_wikisql(root: Path, name: str = "dev") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    questions = root / f"{name}.jsonl"
    questions.write_text("".join(json.dumps({"phase": 1, "table_id": TABLE["id"], "question": q, "sql": sql}) + "\n"
                                 for q, sql in WIKISQL))
    (root / f"{name}.tables.jsonl").write_text(json.dumps(TABLE) + "\n")
    return questions


def _tsv(path: Path, rows) -> Path:
    header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"]
    lines = ["\t".join(header)]
    for k, (pair_id, genre, s1, s2, label) in enumerate(rows):
        lines.append("\t".join([str(k), str(100 + k), pair_id, genre, s1, s2, label]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_mnli(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [_tsv(root / "dev_matched.tsv", MNLI_MATCHED), _tsv(root / "dev_mismatched.tsv", MNLI_MISMATCHED)]


def write_samsum(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "val.json"
    path.write_text(json.dumps(SAMSUM, indent=1))
    return path
