"""Files the tests write (nothing is downloaded): tiny model dirs, tokenizers, and task data with known answers.

    save_tiny("gpt_neox", 512, out, tokenizer=DEMO_TOKENIZER)   # random-weight HF model dir, several shards
    tiny_model("llama")                                         # the same, in memory
    train_bpe_tokenizer(texts, out)  train_sentencepiece_model(texts, out / "tokenizer.model")
    write_fixture("wikisql-original", tmp_path)   # -> [tmp_path/train.jsonl] (+ train.tables.jsonl beside it)
    write_wikisql(tmp_path)  write_mnli(tmp_path)  write_samsum(tmp_path)   # small eval sets, known answers
    write_fixture("chat-sharegpt-jsonl", tmp_path)  save_chat_tokenizer(out)   # chat data; a ChatML tokenizer
    python tests/fixtures.py OUT --records 5000   # every download-format set at that size, plus both tokenizers

The download-format sets are seeded and synthetic but keep what makes the real files awkward: headers and
quoting, `\\r\\n` mixed with `\\n`, stray quotes in MNLI sentences, numbers (ints and floats) in
WikiSQL conditions, duplicate and quoted WikiSQL column names, tables without the optional fields,
MNLI "-" gold labels, dialogues with commas, quotes and line breaks. Both tokenizers are deterministic for the
same texts and keep text verbatim (newlines, `\\r`, quotes, emoji): the BPE works on bytes, the SentencePiece
model falls back to bytes and does not normalize.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path

# ---- tiny models -------------------------------------------------------------------------------------------


def tiny_model(family: str, attn_implementation: str = "auto", **overrides):
    """A random-weight model of lora_ds's tiny preset of `family` (tiny-<family>, underscores as hyphens: "gpt_neox",
    "llama3", "gemma2", ...) (seed 0, fp32), `overrides` changing its config. auto: the attention the trainer picks
    for unpacked rows on this machine."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ds.model import PRESETS, attention_implementation

    torch.manual_seed(0)
    model_type, kwargs = PRESETS[f"tiny-{family.replace('_', '-')}"]
    config = AutoConfig.for_model(model_type, **dict(kwargs, **overrides))
    attention = attention_implementation(attn_implementation, config)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)


def save_model_dir(model, out: Path, tokenizer: Path | None = None) -> Path:
    """`model` as a HF model dir in several safetensors shards with an index, with the tokenizer files of the
    dir `tokenizer` copied in."""
    model.save_pretrained(out, max_shard_size="100KB")
    if tokenizer is not None:
        for f in Path(tokenizer).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, Path(out) / f.name)
    return Path(out)


def save_tiny(family: str, vocab_size: int, out: Path, tokenizer: Path | None = None, **overrides) -> Path:
    """A tiny random-weight HF model dir (`tiny_model`'s) with `vocab_size` tokens; see `save_model_dir`."""
    return save_model_dir(tiny_model(family, vocab_size=vocab_size, **overrides), out, tokenizer)


def demo_texts() -> list[str]:
    """The demo's training examples as text (prompt + completion), to train tokenizers on."""
    lines = (Path(__file__).resolve().parents[1] / "launcher" / "demo" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] + json.loads(line)["completion"] for line in lines]


# ---- tokenizers --------------------------------------------------------------------------------------------

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE (GPT-2 style) saved as a transformers tokenizer dir; BOS = EOS = `<|endoftext|>`.

    The dir holds tokenizer.json and tokenizer_config.json and loads with `AutoTokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def train_sentencepiece_model(texts: list[str], out_file: Path, vocab_size: int = 400) -> Path:
    """A Llama-style SentencePiece BPE `tokenizer.model`: unk=0, bos=1, eos=2, no pad, byte fallback.

    SentencePiece trains on lines, so texts are split at line breaks; byte fallback (which needs
    256 byte pieces, hence the larger vocab) still encodes the line breaks themselves.
    """
    import sentencepiece as spm

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.getvalue())
    return out_file


CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# The common ChatML template, with transformers' {% generation %} marks around what an assistant says (so that
# apply_chat_template's assistant mask can be compared with prep's labels).
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_chat_tokenizer(out_dir: Path, chat_template: str | None = CHATML_GENERATION) -> Path:
    """A byte-level BPE (`train_bpe_tokenizer`) of the tasks' and the chat fixtures' text, with CHAT_TOKENS added
    as special tokens and `chat_template` as its own."""
    from transformers import AutoTokenizer

    texts = tokenizer_texts() + [m["content"] for r in chat_data(40) for m in r["messages"]]
    tok = AutoTokenizer.from_pretrained(str(train_bpe_tokenizer(texts, out_dir)))
    tok.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
    return Path(out_dir)


# ---- task files in the real download layouts (data prep, task readers) -------------------------------------

WORDS = (
    "river city mayor team player club season goal coach match score county station election party "
    "village bridge harbour festival school winner runner title album song year round venue"
).split()
NAMES = ["Amanda", "Jerry", "Olivia", "Sam", "Kwame", "Zoë", "Łukasz", "O'Neil", "Mary-Jane", "Chen"]
COLUMNS = [
    ("Player", "text"),
    ("No.", "real"),
    ("Height (ft)", "real"),
    ('Team "Club"', "text"),
    ("Coach's name", "text"),
    ("Score", "real"),
    ("Points AND Goals", "real"),
    ("Year", "real"),
    ("Result, notes", "text"),
    ("Venue", "text"),
    ("", "text"),
]
STRING_VALUES = ["Ayr United", "O'Brien", 'The "Rovers"', "St. Mary's, Leeds", "1–0", "Zoë", "AND", "= x"]
NUMBER_VALUES = [3, 3.0, 1997, 2.5, -4, 0, 0.75, 100000.0, 12]
LABELS = ("entailment", "neutral", "contradiction")


def _sentence(rng: random.Random, n: int = 8) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, n))]
    return " ".join(words).capitalize() + "."


# WikiSQL


def wikisql_data(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(tables, questions) in the original release's layout: conds values are strings, ints or floats."""
    rng = random.Random(seed)
    tables = []
    for t in range(max(4, n // 5)):
        cols = rng.sample(COLUMNS, rng.randint(2, 6))
        if t % 3 == 0:
            cols.append(cols[0])  # a repeated column name, as some WikiSQL tables have
        table = {
            "id": f"1-{1000 + t}-1",
            "header": [c for c, _ in cols],
            "types": [k for _, k in cols],
            "rows": [
                [rng.choice(STRING_VALUES) if k == "text" else rng.choice(NUMBER_VALUES) for _, k in cols]
                for _ in range(2)
            ],
        }
        if t % 2 == 0:  # optional fields, present on some tables only
            table.update(
                page_title=_sentence(rng, 4), section_title="Results", caption=_sentence(rng, 5), name=f"table_{t}"
            )
        tables.append(table)
    questions = []
    for i in range(n):
        table = tables[i % len(tables)]
        width = len(table["header"])
        conds = []
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            value = rng.choice(NUMBER_VALUES) if rng.random() < 0.4 else rng.choice(STRING_VALUES)
            conds.append([rng.randrange(width), rng.randrange(3 if rng.random() < 0.95 else 4), value])
        questions.append(
            {
                "phase": 1,
                "table_id": table["id"],
                "question": f"What is the {_sentence(rng)[:-1]}?",
                "sql": {"sel": rng.randrange(width), "agg": rng.randrange(6), "conds": conds},
            }
        )
    return tables, questions


def _write_lines(path: Path, records: list[dict]) -> Path:
    """JSON lines, every third ending in \\r\\n (the downloads mix line endings)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(record, ensure_ascii=i % 2 == 0) + ("\r\n" if i % 3 == 0 else "\n"))
    return path


def wikisql_hf_rows(n: int) -> list[dict]:
    from lora_ds.tasks.wikisql import render_sql

    tables, questions = wikisql_data(n)
    by_id = {t["id"]: t for t in tables}
    rows = []
    for q in questions:
        t = by_id[q["table_id"]]
        conds = q["sql"]["conds"]
        table = {
            "header": t["header"],
            "page_title": t.get("page_title", ""),
            "page_id": "",
            "types": t["types"],
            "id": t["id"],
            "section_title": t.get("section_title", ""),
            "caption": t.get("caption", ""),
            "rows": [[str(v) for v in row] for row in t["rows"]],
            "name": t.get("name", ""),
        }
        sql = {
            "human_readable": render_sql(q["sql"], t["header"]),
            "sel": q["sql"]["sel"],
            "agg": q["sql"]["agg"],
            "conds": {
                "column_index": [c[0] for c in conds],
                "operator_index": [c[1] for c in conds],
                "condition": [str(c[2]) for c in conds],
            },
        }  # the export stores every value as a string
        rows.append({"phase": q["phase"], "question": q["question"], "table": table, "sql": sql})
    return rows


def _wikisql_hf_schema():
    import pyarrow as pa

    strings = pa.list_(pa.string())
    table = pa.struct(
        [
            ("header", strings),
            ("page_title", pa.string()),
            ("page_id", pa.string()),
            ("types", strings),
            ("id", pa.string()),
            ("section_title", pa.string()),
            ("caption", pa.string()),
            ("rows", pa.list_(strings)),
            ("name", pa.string()),
        ]
    )
    conds = pa.struct(
        [("column_index", pa.list_(pa.int32())), ("operator_index", pa.list_(pa.int32())), ("condition", strings)]
    )
    sql = pa.struct([("human_readable", pa.string()), ("sel", pa.int32()), ("agg", pa.int32()), ("conds", conds)])
    return pa.schema([("phase", pa.int32()), ("question", pa.string()), ("table", table), ("sql", sql)])


# MNLI


def mnli_data(n: int, seed: int = 1) -> list[dict]:
    """Records with the MultiNLI fields; about one in ten has no majority label ("-")."""
    rng = random.Random(seed)
    quirks = ['He said "no way.', "It's the '90s", 'a "quoted" phrase', "5' 11\" tall", "tab-free text"]
    out = []
    for i in range(n):
        premise = f"{_sentence(rng, 12)} {rng.choice(quirks)}" if i % 4 == 0 else _sentence(rng, 14)
        votes = [rng.choice(LABELS) for _ in range(5)]
        gold = "-" if i % 10 == 7 else rng.choice(LABELS)
        out.append(
            {
                "annotator_labels": votes,
                "genre": rng.choice(["fiction", "government", "travel"]),
                "gold_label": gold,
                "pairID": f"{1000 + i}{'enc'[i % 3]}",
                "promptID": str(1000 + i),
                "sentence1": premise,
                "sentence2": _sentence(rng, 9),
                "sentence1_binary_parse": "( x )",
                "sentence2_binary_parse": "( y )",
                "sentence1_parse": "(ROOT (S x))",
                "sentence2_parse": "(ROOT (S y))",
            }
        )
    return out


def _write_glue_tsv(path: Path, records: list[dict], labels: int) -> Path:
    """GLUE's layout: train has label1 + gold_label, dev label1..label5 + gold_label, test none."""
    label_cols = [f"label{k}" for k in range(1, labels + 1)] + (["gold_label"] if labels else [])
    header = [
        "index",
        "promptID",
        "pairID",
        "genre",
        "sentence1_binary_parse",
        "sentence2_binary_parse",
        "sentence1_parse",
        "sentence2_parse",
        "sentence1",
        "sentence2",
    ] + label_cols
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for i, r in enumerate(r for r in records if r["gold_label"] != "-"):  # GLUE dropped them
            fields = (
                [
                    str(i),
                    r["promptID"],
                    r["pairID"],
                    r["genre"],
                    r["sentence1_binary_parse"],
                    r["sentence2_binary_parse"],
                    r["sentence1_parse"],
                    r["sentence2_parse"],
                    r["sentence1"],
                    r["sentence2"],
                ]
                + r["annotator_labels"][:labels]
                + ([r["gold_label"]] if labels else [])
            )
            f.write("\t".join(fields) + ("\r\n" if i % 3 == 0 else "\n"))
    return path


def mnli_hf_rows(n: int) -> list[dict]:
    return [
        {"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": LABELS.index(r["gold_label"]), "idx": i}
        for i, r in enumerate(r for r in mnli_data(n) if r["gold_label"] != "-")
    ]


# SAMSum


def samsum_data(n: int, seed: int = 2) -> list[dict]:
    """{id, dialogue, summary}: utterances joined by \\r\\n or \\n (mixed within a dialogue)."""
    rng = random.Random(seed)
    extras = ["ok, see you at 5?", 'she said "maybe"', "I'll bring it :-)", "lol 😂", "fine,fine,fine", "<file_photo>"]
    out = []
    for i in range(n):
        speakers = rng.sample(NAMES, 2)
        lines = [
            f"{speakers[k % 2]}: {_sentence(rng, 10) if k % 3 else rng.choice(extras)}"
            for k in range(rng.randint(2, 7))
        ]
        dialogue = ""
        for k, line in enumerate(lines):
            dialogue += line + ("" if k == len(lines) - 1 else rng.choice(["\r\n", "\n"]))
        summary = f"{speakers[0]} and {speakers[1]} talk about the {rng.choice(WORDS)}, {rng.choice(WORDS)}."
        out.append({"id": f"13{680000 + i * 7}", "summary": summary, "dialogue": dialogue})
    return out


# Chat


def chat_data(n: int, seed: int = 3) -> list[dict]:
    """{id, messages}: a system turn in one of three conversations, then one to four exchanges; contents hold
    quotes, \\r\\n and \\n, emoji, markup, tabs and trailing spaces."""
    rng = random.Random(seed)
    extras = ['she said "maybe"', "line one\nline two", "a,\r\nb", "lol 😂", "<b>bold</b> & co", "tab\tand ", "Zoë's"]
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
        for k in range(rng.randint(1, 4)):
            question = f"{_sentence(rng, 10)[:-1]}?" if k % 2 else f"{_sentence(rng)} {rng.choice(extras)}"
            answer = _sentence(rng, 14) + (f" {rng.choice(extras)}" if rng.random() < 0.3 else "")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"id": f"c{i}", "messages": messages})
    return out


SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(record: dict) -> dict:
    """A `chat_data` record in ShareGPT's layout."""
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in record["messages"]]
    return {"id": record["id"], "conversations": turns}


def instruction_data(n: int, seed: int = 4) -> list[dict]:
    """Alpaca records: the input empty in one of two, absent in one of five; a system field in one of four."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        record = {"instruction": f"Rewrite: {_sentence(rng)}", "input": _sentence(rng, 12) if i % 2 else ""}
        record["output"] = _sentence(rng, 14)
        if i % 5 == 4:
            del record["input"]
        if i % 4 == 1:
            record["system"] = "Answer in English."
        out.append(record)
    return out


def _write_chat(name: str, directory: Path, n: int) -> list[Path]:
    layout, _, container = name.removeprefix("chat-").rpartition("-")
    if layout == "messages":
        records = chat_data(n)
    elif layout == "sharegpt":
        records = [sharegpt(r) for r in chat_data(n)]
    else:
        records = instruction_data(n)
        if layout == "prompt-completion":
            records = [{"prompt": r["instruction"], "completion": r["output"]} for r in records]
    if container == "saved":
        from datasets import Dataset

        Dataset.from_list(records).save_to_disk(str(directory / "train"))
        return [directory / "train"]
    if container == "parquet":  # every column in every row: null where a record lacks the field
        columns = dict.fromkeys(key for r in records for key in r)
        rows = [{key: r.get(key) for key in columns} for r in records]
        return [_write_parquet(directory / "train-00000-of-00001.parquet", rows)]
    if container == "json":
        path = directory / "train.json"
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
        return [path]
    return [_write_lines(directory / "train.jsonl", records)]


# Writing the sets


def _write_parquet(path: Path, rows: list[dict], schema=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_fixture(name: str, directory: Path, n: int = 40) -> list[Path]:
    """Write fixture set `name` (of FIXTURES or CHAT_FIXTURES) with about `n` records; returns the --src paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if name == "wikisql-original":
        tables, questions = wikisql_data(n)
        _write_lines(directory / "train.tables.jsonl", tables)
        return [_write_lines(directory / "train.jsonl", questions)]
    if name == "wikisql-hf-parquet":
        return [_write_parquet(directory / "train-00000-of-00001.parquet", wikisql_hf_rows(n), _wikisql_hf_schema())]
    if name == "wikisql-hf-jsonl":
        return [_write_lines(directory / "train.jsonl", wikisql_hf_rows(n))]
    if name == "mnli-glue":
        return [_write_glue_tsv(directory / "train.tsv", mnli_data(n), labels=1)]
    if name == "mnli-glue-dev":
        return [_write_glue_tsv(directory / "dev_matched.tsv", mnli_data(n), labels=5)]
    if name == "mnli-original":
        return [_write_lines(directory / "multinli_1.0_train.jsonl", mnli_data(n))]
    if name == "mnli-hf-parquet":
        return [_write_parquet(directory / "train-00000-of-00001.parquet", mnli_hf_rows(n))]
    if name == "mnli-hf-jsonl":
        return [_write_lines(directory / "train.jsonl", mnli_hf_rows(n))]
    if name == "samsum-corpus":
        path = directory / "train.json"
        path.write_text(json.dumps(samsum_data(n), indent=2, ensure_ascii=False), encoding="utf-8")
        return [path]
    if name == "samsum-csv":
        path = directory / "samsum-train.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)  # quotes fields holding commas, quotes or line breaks; rows end in \r\n
            writer.writerow(["id", "dialogue", "summary"])
            writer.writerows([r["id"], r["dialogue"], r["summary"]] for r in samsum_data(n))
        return [path]
    if name == "samsum-hf-parquet":
        return [_write_parquet(directory / "train-00000-of-00001.parquet", samsum_data(n))]
    if name == "samsum-hf-jsonl":
        return [_write_lines(directory / "train.jsonl", samsum_data(n))]
    if name in CHAT_FIXTURES:
        return _write_chat(name, directory, n)
    raise ValueError(f"unknown fixture {name!r}")


FIXTURES = {  # fixture set -> task
    "wikisql-original": "wikisql",
    "wikisql-hf-parquet": "wikisql",
    "wikisql-hf-jsonl": "wikisql",
    "mnli-glue": "mnli",
    "mnli-glue-dev": "mnli",
    "mnli-original": "mnli",
    "mnli-hf-parquet": "mnli",
    "mnli-hf-jsonl": "mnli",
    "samsum-corpus": "samsum",
    "samsum-csv": "samsum",
    "samsum-hf-parquet": "samsum",
    "samsum-hf-jsonl": "samsum",
}
CHAT_FIXTURES = {  # chat data: fixture set -> layout (chat-LAYOUT-CONTAINER)
    "chat-messages-jsonl": "messages",
    "chat-messages-parquet": "messages",
    "chat-messages-saved": "messages",
    "chat-sharegpt-json": "sharegpt",
    "chat-sharegpt-jsonl": "sharegpt",
    "chat-alpaca-json": "alpaca",
    "chat-alpaca-parquet": "alpaca",
    "chat-prompt-completion-jsonl": "prompt_completion",
}


# ---- small eval sets with known answers (evaluation, metrics) ----------------------------------------------

TABLE = {
    "id": "1-1000-1",
    "header": ["Player", "No.", "Position", "Years", "Goals"],
    "types": ["text", "real", "text", "text", "real"],
    "rows": [
        ["Alan Smith", 3, "Forward", "1990-1995", 12],
        ["Bob Jones", 7, "Defender", "1993", 4],
        ["Carl Brown", 10, "Forward", "1996-2000", 10],
    ],
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
    {
        "id": "s1",
        "dialogue": "Anna: Are you coming?\r\nTom: Yes, in 10 minutes.",
        "summary": "Tom is coming in 10 minutes.",
    },
    {
        "id": "s2",
        "dialogue": "John: I bought apples.\nMary: I ate them!",
        "summary": "John bought apples. Mary ate them.",
    },
    {"id": "s3", "dialogue": "Anna: Call Tom.\nBen: He is late.", "summary": "Anna calls Tom. Tom is late."},
]


def write_wikisql(root: Path, name: str = "dev") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    questions = root / f"{name}.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"phase": 1, "table_id": TABLE["id"], "question": q, "sql": sql}) + "\n" for q, sql in WIKISQL
        )
    )
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


# ---- a poisoned checkpoint ---------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command: what a poisoned checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


# ---- by hand -----------------------------------------------------------------------------------------------


def tokenizer_texts(n: int = 40) -> list[str]:
    """Text of every task's fixtures, rendered with the task templates, to train the test tokenizers on."""
    from lora_ds.tasks import mnli, samsum, wikisql

    tables, questions = wikisql_data(n)
    by_id = {t["id"]: t for t in tables}
    texts = ["".join(wikisql.render({**q, **by_id[q["table_id"]]})) for q in questions]
    texts += [
        "".join(mnli.render({"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": label}))
        for r in mnli_data(n)
        for label in LABELS[:1]
    ]
    texts += ["".join(samsum.render(r)) for r in samsum_data(n)]
    return texts


def main(argv: list[str] | None = None) -> None:
    """Write every fixture set at a given size, plus the test tokenizers, for measuring prep by hand."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--records", type=int, default=40)
    args = parser.parse_args(argv)
    train_bpe_tokenizer(tokenizer_texts(), args.out / "bpe")
    train_sentencepiece_model(tokenizer_texts(), args.out / "sp" / "tokenizer.model")
    save_chat_tokenizer(args.out / "chat-tokenizer")
    for name, task in {**FIXTURES, **dict.fromkeys(CHAT_FIXTURES, "chat")}.items():
        src = write_fixture(name, args.out / name, args.records)
        print(f"{task} {' '.join(map(str, src))}")


if __name__ == "__main__":
    main()
