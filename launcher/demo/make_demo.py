"""Regenerate the demo's sample task and tokenizer (deterministic; the outputs are committed).

    python launcher/demo/make_demo.py

The task is WikiSQL-shaped: a table schema and a question in, the SQL out. The facts are made up;
the point is a sample small enough to ship that a tiny model visibly learns within a few dozen steps.

train.jsonl, eval.jsonl: prompt/completion records (the trainer's defaults, and the tests' data).
wikisql/: the same kind of questions in the WikiSQL release's own format ({split}.jsonl of questions,
{split}.tables.jsonl of tables with their rows), which `lora-ds prep wikisql` renders with the task's
template and `lora-ds eval --task wikisql` scores by logical form and execution: the data of `make demo`.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
CITIES = ["Aldport", "Brindle", "Corvale", "Dunmere", "Eastwick", "Farrow", "Glenhollow", "Harwick", "Ivydale",
          "Jasper Bay", "Kingsmoor", "Larkfield", "Marlow", "Northgate", "Oakridge", "Pinecrest", "Queensbury",
          "Ravenhill", "Stonebridge", "Thornbury", "Umberton", "Valewood", "Westmere", "Yarrow", "Zephyr Point"]
COLUMNS = {"population": "real", "mayor": "text", "founded": "real", "river": "text", "region": "text"}
QUESTIONS = {
    "population": ("How many people live in {c}?", "SELECT population FROM table WHERE city = {c}"),
    "mayor": ("Who is the mayor of {c}?", "SELECT mayor FROM table WHERE city = {c}"),
    "founded": ("When was {c} founded?", "SELECT founded FROM table WHERE city = {c}"),
    "river": ("Which river runs through {c}?", "SELECT river FROM table WHERE city = {c}"),
    "region": ("In which region is {c}?", "SELECT region FROM table WHERE city = {c}"),
}
AGG = [("How many cities are in the {r} region?", "SELECT COUNT city FROM table WHERE region = {r}"),
       ("What is the largest population in the {r} region?", "SELECT MAX population FROM table WHERE region = {r}")]
REGIONS = ["North", "South", "Coast", "Highlands", "Plains"]


def examples(rng: random.Random, n: int):
    out = []
    for _ in range(n):
        cols = rng.sample(sorted(COLUMNS), 3)
        schema = "city (text) | " + " | ".join(f"{c} ({COLUMNS[c]})" for c in cols)
        if rng.random() < 0.2:
            region = rng.choice(REGIONS)
            question, sql = (s.format(r=region) for s in rng.choice(AGG))
            schema = "city (text) | population (real) | region (text)"
        else:
            col = rng.choice(cols)
            city = rng.choice(CITIES)
            question, sql = (s.format(c=city) for s in QUESTIONS[col])
        out.append({"prompt": f"Table: {schema}\nQuestion: {question}\nSQL:", "completion": f" {sql}"})
    return out


def wikisql_facts(rng: random.Random) -> dict:
    """{city: {column: value}}: one made-up world that every table of the WikiSQL sample draws rows from."""
    mayors = ["Ada Finch", "Bo Lind", "Cy Moss", "Di Park", "Ed Rowe", "Flo Hart", "Gus Penn", "Hal Cole"]
    rivers = ["Aire", "Blyth", "Coln", "Dove", "Esk", "Frome", "Glaze"]
    return {
        city: {
            "city": city,
            "population": rng.randrange(2, 400) * 1000,
            "mayor": rng.choice(mayors),
            "founded": rng.randrange(1100, 1950),
            "river": rng.choice(rivers),
            "region": rng.choice(REGIONS),
        }
        for city in CITIES
    }


def wikisql_tables(rng: random.Random, facts: dict, n: int, prefix: str) -> list[dict]:
    """Tables in the release's tables-file format: city plus three other columns, rows for 6 to 10 cities."""
    tables = []
    for k in range(n):
        header = ["city", *rng.sample(sorted(COLUMNS), 3)]
        cities = rng.sample(CITIES, rng.randrange(6, 11))
        tables.append({
            "id": f"{prefix}-{k}",
            "header": header,
            "types": ["text", *(COLUMNS[c] for c in header[1:])],
            "rows": [[facts[c][col] for col in header] for c in cities],
        })
    return tables


def wikisql_question(rng: random.Random, table: dict) -> dict:
    """A question on `table` in the release's format: {table_id, question, sql: {sel, agg, conds}}."""
    header = table["header"]
    if "region" in header and rng.random() < 0.2:
        region = rng.choice(sorted({row[header.index("region")] for row in table["rows"]}))
        if "population" in header and rng.random() < 0.5:
            question, sel, agg = f"What is the largest population in the {region} region?", "population", 1
        else:
            question, sel, agg = f"How many cities are in the {region} region?", "city", 3
        conds = [[header.index("region"), 0, region]]
    else:
        sel, agg = rng.choice(header[1:]), 0
        city = rng.choice(table["rows"])[0]
        question = QUESTIONS[sel][0].format(c=city)
        conds = [[0, 0, city]]
    return {"phase": 1, "table_id": table["id"], "question": question,
            "sql": {"sel": header.index(sel), "agg": agg, "conds": conds}}


def write_wikisql(rng: random.Random, out_dir: str) -> None:
    """wikisql/train.jsonl (480 questions) and dev.jsonl (64), each with its tables file beside it, and a
    tokenizer trained on the training questions as WikiSQL's template renders them (wikisql/tokenizer/)."""
    from lora_ds.tasks import wikisql

    os.makedirs(out_dir, exist_ok=True)
    facts = wikisql_facts(rng)
    for split, n_tables, n_questions in (("train", 60, 480), ("dev", 16, 64)):
        tables = wikisql_tables(rng, facts, n_tables, split)
        questions = [wikisql_question(rng, tables[i % n_tables]) for i in range(n_questions)]
        rng.shuffle(questions)
        for name, rows in ((f"{split}.jsonl", questions), (f"{split}.tables.jsonl", tables)):
            with open(os.path.join(out_dir, name), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if split == "train":
            by_id = {t["id"]: t for t in tables}
            texts = ["".join(wikisql.render({**q, **by_id[q["table_id"]]})) for q in questions]
    train_tokenizer(texts, os.path.join(out_dir, "tokenizer"))


def train_tokenizer(texts, out_dir: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(out_dir)


def main():
    rng = random.Random(1234)
    train, held_out = examples(rng, 480), examples(rng, 64)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(os.path.join(HERE, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    train_tokenizer([r["prompt"] + r["completion"] for r in train], os.path.join(HERE, "tokenizer"))
    write_wikisql(random.Random(2026), os.path.join(HERE, "wikisql"))


if __name__ == "__main__":
    main()
