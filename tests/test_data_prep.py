"""Data prep end to end: every task and download format, both tokenizer kinds, determinism, packing,
length limits, bad input (through the real CLI) and reading the result back for training."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from fixtures import (
    FIXTURES,
    mnli_data,
    samsum_data,
    tokenizer_texts,
    train_bpe_tokenizer,
    train_sentencepiece_model,
    write_fixture,
)
from helpers import run_cli

from data_prep import common
from lora_ds.data import IGNORE_INDEX, encode_pair
from lora_ds.errors import UserError
from lora_ds.tasks import get_task, samsum
from lora_ds.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    """Both kinds the tests train: a HF byte-level BPE dir and a bare SentencePiece tokenizer.model."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = tokenizer_texts()
    return {
        "bpe": str(train_bpe_tokenizer(texts, root / "bpe")),
        "sp": str(train_sentencepiece_model(texts, root / "sp" / "tokenizer.model")),
    }


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("fixtures")
    return {name: [str(p) for p in write_fixture(name, root / name)] for name in FIXTURES}


def prep(task, src, tokenizer, out, **kw) -> dict:
    manifest, _ = common.prepare(common.Settings(task=task, src=list(src), tokenizer=tokenizer, out=str(out), **kw))
    return manifest


def load(out):
    from datasets import load_from_disk

    return load_from_disk(str(out))


def dir_digest(path) -> dict[str, str]:
    return {name: hashlib.sha256((Path(path) / name).read_bytes()).hexdigest() for name in sorted(os.listdir(path))}


def expected_rows(task: str, src: list[str], tok, max_len: int = common.DEFAULT_MAX_LEN) -> list[dict]:
    """What prep must produce: encode_pair of each usable record rendered by the task's template."""
    module = get_task(task)
    rows = []
    for path in src:
        fmt, _ = module.detect(path)
        for _, record in module.read(path, fmt):
            assert not isinstance(record, Exception), record
            if record is not None:
                row, _ = encode_pair(tok, *module.render(record), max_len)
                rows.append(dict(row, id=record["id"], length=len(row["input_ids"])))
    return rows


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_format_prepares_to_rendered_encoded_examples(name, kind, sources, tokenizers, tmp_path):
    task = FIXTURES[name]
    manifest = prep(task, sources[name], tokenizers[kind], tmp_path / "out")
    tok = load_tokenizer(tokenizers[kind])
    want = expected_rows(task, sources[name], tok)
    got = load(tmp_path / "out")
    assert len(got) == len(want) >= 30
    assert got.to_list() == want
    for row in got.select(range(5)):
        n_context = row["labels"].count(IGNORE_INDEX)
        assert row["labels"][n_context:] == row["input_ids"][n_context:] and row["input_ids"][-1] == tok.eos_token_id
        assert row["labels"][:n_context] == [IGNORE_INDEX] * n_context and n_context > 0
        assert row["position_ids"] == list(range(row["length"]))
    assert got.features["input_ids"].feature.dtype == "int32" and got.features["labels"].feature.dtype == "int32"

    counts = manifest["counts"]
    assert counts["kept"] == counts["rows"] == len(want) and counts["skipped"] == counts["dropped"] == 0
    assert counts["read"] == counts["kept"] + counts["filtered"]
    assert counts["filtered"] == (4 if name == "mnli-original" else 0)  # MultiNLI's "-" gold labels
    assert manifest["task"] == task and manifest["split"] == "train" and manifest["template"] == get_task(task).TEMPLATE
    assert manifest["tokenizer"]["identity"] == tok.identity
    stats = manifest["length_stats"]
    assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"] == max(got["length"])
    for source in manifest["sources"]:
        assert source["sha256"] == hashlib.sha256(Path(source["path"]).read_bytes()).hexdigest()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_csv_dialogues_come_through_verbatim(sources, tokenizers, tmp_path):
    tok = load_tokenizer(tokenizers["bpe"])  # byte-level: decoding gives back the exact text
    prep("samsum", sources["samsum-csv"], tokenizers["bpe"], tmp_path / "out")
    records = {r["id"]: r for r in samsum_data(40)}
    assert any("\r\n" in r["dialogue"] for r in records.values())
    for row in load(tmp_path / "out"):
        n_context = row["labels"].count(IGNORE_INDEX)
        prompt, summary = samsum.render(records[row["id"]])
        assert tok.decode(row["input_ids"][:n_context]) == prompt
        assert tok.decode(row["input_ids"][n_context:]) == summary


@pytest.mark.parametrize(
    "names",
    [
        ["wikisql-hf-parquet", "wikisql-hf-jsonl"],
        ["mnli-glue", "mnli-glue-dev", "mnli-original", "mnli-hf-parquet", "mnli-hf-jsonl"],
        ["samsum-corpus", "samsum-csv", "samsum-hf-parquet", "samsum-hf-jsonl"],
    ],
)
def test_formats_of_one_task_give_the_same_examples(names, sources, tokenizers, tmp_path):
    columns = []
    for name in names:
        prep(FIXTURES[name], sources[name], tokenizers["bpe"], tmp_path / name)
        columns.append(load(tmp_path / name)["input_ids"])
    assert all(c == columns[0] for c in columns[1:])


def test_output_is_byte_identical_across_runs_and_process_counts(sources, tokenizers, tmp_path):
    src = sources["wikisql-original"]
    prep("wikisql", src, tokenizers["sp"], tmp_path / "a", pack=300)
    prep("wikisql", src, tokenizers["sp"], tmp_path / "b", pack=300)
    prep("wikisql", src, tokenizers["sp"], tmp_path / "c", pack=300, num_proc=2)
    assert dir_digest(tmp_path / "a") == dir_digest(tmp_path / "b") == dir_digest(tmp_path / "c")
    assert sorted(dir_digest(tmp_path / "a")) == [
        "data-00000-of-00001.arrow",
        "dataset_info.json",
        "manifest.json",
        "state.json",
    ]


def test_num_proc_gives_the_same_rows_with_a_hf_tokenizer(sources, tokenizers, tmp_path):
    src = sources["samsum-corpus"]
    prep("samsum", src, tokenizers["bpe"], tmp_path / "one")
    prep("samsum", src, tokenizers["bpe"], tmp_path / "two", num_proc=2)
    assert dir_digest(tmp_path / "one") == dir_digest(tmp_path / "two")


def test_packing_keeps_examples_whole_with_restarting_positions(sources, tokenizers, tmp_path):
    prep("mnli", sources["mnli-glue"], tokenizers["bpe"], tmp_path / "plain")
    manifest = prep("mnli", sources["mnli-glue"], tokenizers["bpe"], tmp_path / "packed", pack=512)
    plain = {r["id"]: r for r in load(tmp_path / "plain")}
    packed = load(tmp_path / "packed")
    assert manifest["max_len"] == 512 and manifest["counts"]["rows"] == len(packed) < len(plain) / 2
    assert manifest["packed_length_stats"]["total"] == manifest["length_stats"]["total"]
    seen = []
    for row in packed:
        assert row["length"] == len(row["input_ids"]) <= 512
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [row["length"]]
        ids = row["id"].split(",")
        assert len(ids) == len(starts) - 1
        for ex_id, a, b in zip(ids, starts, starts[1:]):
            alone = plain[ex_id]
            assert row["input_ids"][a:b] == alone["input_ids"] and row["labels"][a:b] == alone["labels"]
        seen += ids
    assert sorted(seen) == sorted(plain)


def test_overlong_examples_are_truncated_from_the_context_or_dropped(sources, tokenizers, tmp_path):
    tok = load_tokenizer(tokenizers["bpe"])
    src = sources["samsum-corpus"]
    prep("samsum", src, tokenizers["bpe"], tmp_path / "full")
    full = {r["id"]: r for r in load(tmp_path / "full")}
    limit = sorted(r["length"] for r in full.values())[len(full) // 2]
    manifest = prep("samsum", src, tokenizers["bpe"], tmp_path / "cut", max_len=limit)
    cut = load(tmp_path / "cut")
    assert manifest["counts"]["truncated"] == sum(r["length"] > limit for r in full.values()) > 0
    for row in cut:
        whole = full[row["id"]]
        assert row["length"] <= limit
        assert row["input_ids"][-3:] == whole["input_ids"][-3:]  # the target's end is intact
        n_target = len(whole["labels"]) - whole["labels"].count(IGNORE_INDEX)
        assert row["labels"][-n_target:] == whole["labels"][-n_target:]
    manifest = prep("samsum", src, tokenizers["bpe"], tmp_path / "drop", max_len=limit, drop_overlong=True)
    assert manifest["counts"]["dropped"] == sum(r["length"] > limit for r in full.values())
    assert manifest["counts"]["kept"] == len(load(tmp_path / "drop")) == len(full) - manifest["counts"]["dropped"]
    assert tok.eos_token_id == cut[0]["input_ids"][-1]


def test_training_reads_the_prepared_dir(sources, tokenizers, tmp_path):
    import torch

    from lora_ds.data import StepSampler, collate, load_rows

    tok = load_tokenizer(tokenizers["bpe"])
    prep("wikisql", sources["wikisql-original"], tokenizers["bpe"], tmp_path / "out", pack=512)
    rows = load_rows(str(tmp_path / "out"), tok, 512)
    sampler = StepSampler(len(rows), micro=2, accum=1, world=2, seed=0)
    shares = [sampler.micro_batches(0, rank)[0] for rank in range(2)]
    assert not set(shares[0]) & set(shares[1])
    batch = collate([rows[i] for i in shares[0]], pad_id=tok.pad_token_id)
    assert batch["attention_mask"].shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert batch["attention_mask"].dtype == torch.float32


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_skip_bad_skips_and_counts(tokenizers, tmp_path):
    good = [json.dumps({"premise": f"P {i}.", "hypothesis": "H.", "label": i % 3, "idx": i}) for i in range(6)]
    bad = [
        "{broken",
        json.dumps({"premise": "P.", "label": 1}),
        json.dumps({"premise": "P.", "hypothesis": "H.", "label": 7}),
    ]
    src = write_lines(tmp_path / "mnli.jsonl", good[:3] + bad + good[3:])
    with pytest.raises(UserError, match=r"mnli.jsonl:4: not valid JSON"):
        prep("mnli", [src], tokenizers["bpe"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = prep("mnli", [src], tokenizers["bpe"], tmp_path / "out", skip_bad=True)
    assert manifest["counts"] == {
        "read": 9,
        "filtered": 0,
        "skipped": 3,
        "dropped": 0,
        "truncated": 0,
        "kept": 6,
        "rows": 6,
    }
    assert [m.split(": ")[0] for m in manifest["skipped_records"]] == [f"{src}:{n}" for n in (4, 5, 6)]
    assert "field 'hypothesis' is missing" in manifest["skipped_records"][1]
    assert load(tmp_path / "out")["id"] == [str(i) for i in range(6)]


# ---- bad input through the real CLI ---------------------------------------------------------------------------


def wikisql_files(tmp_path: Path, questions: list, tables: list | None = None) -> str:
    table = {"id": "t1", "header": ["Player", "Goals"], "types": ["text", "real"], "rows": [["A", 1]]}
    write_lines(tmp_path / "dev.tables.jsonl", [json.dumps(t) for t in (tables or [table])])
    return write_lines(tmp_path / "dev.jsonl", [q if isinstance(q, str) else json.dumps(q) for q in questions])


GOOD_Q = {"phase": 1, "table_id": "t1", "question": "Who?", "sql": {"sel": 0, "agg": 0, "conds": [[1, 0, 3]]}}


def bad_wikisql(tmp_path, case):
    if case == "malformed line":
        return "wikisql", wikisql_files(tmp_path, [GOOD_Q, '{"phase": 1, "table_id": '])
    if case == "missing field":
        return "wikisql", wikisql_files(
            tmp_path, [GOOD_Q, GOOD_Q, {k: v for k, v in GOOD_Q.items() if k != "question"}]
        )
    if case == "missing table":
        return "wikisql", wikisql_files(tmp_path, [dict(GOOD_Q, table_id="t9")])
    if case == "column out of range":
        return "wikisql", wikisql_files(tmp_path, [dict(GOOD_Q, sql={"sel": 0, "agg": 0, "conds": [[5, 0, "x"]]})])
    if case == "bad table":
        return "wikisql", wikisql_files(tmp_path, [GOOD_Q], [{"id": "t1", "header": ["a"], "types": ["text", "real"]}])
    if case == "unknown label":
        records = [r for r in mnli_data(6) if r["gold_label"] != "-"]
        records[4]["gold_label"] = "maybe"
        return "mnli", write_lines(tmp_path / "multinli_1.0_dev_matched.jsonl", [json.dumps(r) for r in records])
    if case == "mixed layouts":
        hf = {"premise": "P.", "hypothesis": "H.", "label": 0, "idx": 1}
        return "mnli", write_lines(tmp_path / "multinli.jsonl", [json.dumps(mnli_data(1)[0]), json.dumps(hf)])
    if case == "csv fields":
        return "samsum", write_lines(
            tmp_path / "samsum.csv", ["id,dialogue,summary", '1,"A: hi\r\nB: yo",Greet', '2,"A: hi"']
        )
    raise ValueError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed line", r"dev.jsonl:2: not valid JSON"),
        ("missing field", r"dev.jsonl:3: field 'question' is missing"),
        ("missing table", r"dev.jsonl:1: field 'table_id': no table 't9'"),
        ("column out of range", r"dev.jsonl:1: field 'sql.conds\[0\]\[0\]' is 5, but the header has 2 entries"),
        ("bad table", r"dev.tables.jsonl:1: field 'types' has 2 entries, 'header' 1"),
        ("unknown label", r"multinli_1.0_dev_matched.jsonl:5: field 'gold_label' is 'maybe'"),
        ("mixed layouts", r"multinli.jsonl:2: this record has the Hugging Face export's layout"),
        ("csv fields", r"samsum.csv:4: 2 fields where the header has 3"),
    ],
)
def test_bad_input_fails_with_file_line_and_field_and_leaves_nothing(case, message, tokenizers, tmp_path):
    import re

    task, src = bad_wikisql(tmp_path, case)
    out = tmp_path / "prepared"
    proc = run_cli("prep", task, "--src", src, "--tokenizer", tokenizers["bpe"], "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".prepared")]


def test_wrong_or_mixed_input_is_refused(sources, tokenizers, tmp_path):
    tok = tokenizers["bpe"]
    cases = [
        ("wikisql", sources["mnli-glue"], r"not a WikiSQL file"),
        (
            "wikisql",
            [sources["wikisql-original"][0].replace("train.jsonl", "train.tables.jsonl")],
            r"this is a tables file; pass the questions file train.jsonl",
        ),
        ("mnli", sources["samsum-hf-jsonl"], r"train.jsonl:1: a record with fields dialogue, id, summary"),
        ("samsum", sources["samsum-corpus"] + sources["samsum-csv"], r"--src mixes formats .*is corpus.*is csv"),
        ("mnli", sources["mnli-glue"] + sources["mnli-original"], r"--src mixes formats"),
    ]
    for task, src, message in cases:
        with pytest.raises(UserError, match=message):
            prep(task, src, tok, tmp_path / "out")
    lonely = tmp_path / "lonely" / "dev.jsonl"
    lonely.parent.mkdir()
    lonely.write_text(json.dumps(GOOD_Q) + "\n")
    with pytest.raises(UserError, match=r"need their tables file .*dev.tables.jsonl"):
        prep("wikisql", [str(lonely)], tok, tmp_path / "out")
    test_tsv = tmp_path / "test_matched.tsv"
    test_tsv.write_text("index\tpairID\tsentence1\tsentence2\n0\t1e\tA.\tB.\n")
    proc = run_cli("prep", "mnli", "--src", test_tsv, "--tokenizer", tok, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "no gold_label column (GLUE's test files are unlabeled)" in proc.stderr
    hf_test = write_lines(tmp_path / "test.jsonl", [json.dumps({"premise": "P.", "hypothesis": "H.", "label": -1})])
    with pytest.raises(UserError, match=r"test.jsonl:1: field 'label' is -1, no label"):
        prep("mnli", [hf_test], tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flags_are_checked_before_any_work(sources, tokenizers, tmp_path):
    src, tok = sources["samsum-corpus"], tokenizers["bpe"]
    for kw, message in [
        ({"max_len": 600, "pack": 512}, "--max_len 600 is longer than --pack 512"),
        ({"num_proc": 0}, "--num_proc 0"),
        ({"split": "dev matched"}, "--split 'dev matched'"),
    ]:
        with pytest.raises(UserError, match=message):
            prep("samsum", src, tok, tmp_path / "out", **kw)
    with pytest.raises(UserError, match="--tokenizer .*/nope: no such file"):
        prep("samsum", src, str(tmp_path / "nope"), tmp_path / "out")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not a prepared dir"):
        prep("samsum", src, tok, keep)
    assert (keep / "notes.txt").read_text() == "mine"


def test_cli_prepares_and_the_module_entry_point_matches(sources, tokenizers, tmp_path):
    src = sources["mnli-glue-dev"]
    proc = run_cli(
        "prep",
        "mnli",
        "--src",
        *src,
        "--tokenizer",
        tokenizers["sp"],
        "--out",
        tmp_path / "cli",
        "--split",
        "dev_matched",
        "--pack",
        "256",
    )
    assert proc.returncode == 0, proc.stderr
    assert "mnli dev_matched: read 36, kept 36" in proc.stdout and "examples/s" in proc.stdout
    module = run_cli(
        "--src",
        *src,
        "--tokenizer",
        tokenizers["sp"],
        "--out",
        tmp_path / "module",
        "--split",
        "dev_matched",
        "--pack",
        "256",
        module="data_prep.mnli",
    )
    assert module.returncode == 0, module.stderr
    assert dir_digest(tmp_path / "cli") == dir_digest(tmp_path / "module")
    assert load(tmp_path / "cli").split == "dev_matched"
