"""Prepare MNLI (premise + hypothesis -> entailment / neutral / contradiction) from the downloaded files.

    python -m data_prep.mnli --src glue_data/MNLI/train.tsv --tokenizer /models/llama-7b --out prepared/mnli
    python -m data_prep.mnli --src glue_data/MNLI/dev_matched.tsv --split dev_matched --tokenizer ... --out ...
    lora-ds prep mnli --src multinli_1.0/multinli_1.0_train.jsonl --tokenizer /models/llama-7b --out prepared/mnli

Formats, told from the file name and its header or first record:
  glue      GLUE's TSV files (train.tsv, dev_matched.tsv, dev_mismatched.tsv), read with csv.QUOTE_NONE
            because sentences hold stray quotes; id = pairID. test_*.tsv hold no labels and are refused.
  original  MultiNLI 1.0's multinli_1.0_*.jsonl (sentence1, sentence2, gold_label; id = pairID).
  hf        the Hugging Face export, .parquet or JSON lines (premise, hypothesis, label 0/1/2, id = idx).
A gold label "-" (the annotators reached no majority) leaves the example out, counted as filtered.
"""
from __future__ import annotations

import csv
import os
import sys

from data_prep import common
from data_prep.common import BadRecord, Loc, attempt, field, record_id, text
from lora_ds.errors import UserError
from lora_ds.tasks.mnli import LABELS

GLUE, ORIGINAL, HF = "glue", "original", "hf"
NO_MAJORITY = "-"
EXPECTED = ("GLUE's MNLI .tsv, MultiNLI's multinli_1.0_*.jsonl (sentence1, sentence2, gold_label) or the "
            "Hugging Face export (.parquet or .jsonl with premise, hypothesis, label)")


def detect(path: str) -> tuple[str, list[str]]:
    """(format, files read) of an MNLI file."""
    name = os.path.basename(path)
    if name.endswith(".tsv"):
        header = common.delimited_header(path, "\t", csv.QUOTE_NONE)
        common.check_columns(path, header, ("sentence1", "sentence2"), EXPECTED)
        if "gold_label" not in header:
            raise UserError(f"--src {path}: no gold_label column (GLUE's test files are unlabeled); prepare "
                            "train.tsv, dev_matched.tsv or dev_mismatched.tsv")
        return GLUE, [path]
    if name.endswith(".parquet"):
        common.check_columns(path, common.parquet_columns(path), ("premise", "hypothesis", "label"), EXPECTED)
        return HF, [path]
    if name.endswith((".jsonl", ".json")):
        loc, first = common.first_jsonl_record(path)
        if "sentence1" in first:
            return ORIGINAL, [path]
        if "premise" in first:
            return HF, [path]
        raise UserError(f"{loc}: a record with fields {', '.join(sorted(first))}; expected {EXPECTED}")
    raise UserError(f"--src {path}: not an MNLI file; expected {EXPECTED}")


def read(path: str, fmt: str):
    """(Loc, record or None or BadRecord) per example; a record is {id, premise, hypothesis, label}."""
    if fmt == GLUE:
        for loc, raw in common.read_delimited(path, "\t", csv.QUOTE_NONE):
            yield loc, attempt(_from_sentences, loc, raw, "")
    elif fmt == ORIGINAL:
        for loc, raw in common.read_jsonl(path):
            yield loc, attempt(_from_sentences, loc, raw, "MultiNLI")
    else:
        rows = common.read_parquet(path) if path.endswith(".parquet") else common.read_jsonl(path)
        for loc, raw in rows:
            yield loc, attempt(_from_hf, loc, raw)


def _from_sentences(loc: Loc, raw: dict, layout: str) -> dict | None:
    """A GLUE TSV row or a MultiNLI JSON line (`layout` names the latter, to spot a mixed file)."""
    if layout and "sentence1" not in raw and "premise" in raw:
        raise common.mixed(loc, "Hugging Face export's", "MultiNLI")
    premise, hypothesis = text(raw, "sentence1", loc), text(raw, "sentence2", loc)
    label = field(raw, "gold_label", loc, (str,), "a label word")
    if label == NO_MAJORITY:
        return None
    if label not in LABELS:
        raise BadRecord(f"{loc}: field 'gold_label' is {label!r}, not one of {', '.join(LABELS)} "
                        f"(or {NO_MAJORITY} for no majority)")
    return {"id": record_id(raw, "pairID", loc), "premise": premise, "hypothesis": hypothesis, "label": label}


def _from_hf(loc: Loc, raw: dict) -> dict:
    if "premise" not in raw and "sentence1" in raw:
        raise common.mixed(loc, "MultiNLI", "Hugging Face export's")
    premise, hypothesis = text(raw, "premise", loc), text(raw, "hypothesis", loc)
    label = field(raw, "label", loc, (int,), "0, 1 or 2")
    if label == -1:
        raise BadRecord(f"{loc}: field 'label' is -1, no label (GLUE's test split is unlabeled); prepare the "
                        "train or validation files")
    if not 0 <= label < len(LABELS):
        raise BadRecord(f"{loc}: field 'label' is {label}, not 0, 1 or 2 ({', '.join(LABELS)})")
    return {"id": record_id(raw, "idx", loc), "premise": premise, "hypothesis": hypothesis, "label": LABELS[label]}


if __name__ == "__main__":
    sys.exit(common.main("mnli"))
