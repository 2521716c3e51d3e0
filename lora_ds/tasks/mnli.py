"""MNLI (Williams et al. 2018): premise + hypothesis in, the label word out.

Formats, told from the file name and its header or first record:
  glue      GLUE's TSV files (train.tsv, dev_matched.tsv, dev_mismatched.tsv), read with csv.QUOTE_NONE
            because sentences hold stray quotes; id = pairID. test_*.tsv hold no labels and are refused.
  original  MultiNLI 1.0's multinli_1.0_*.jsonl (sentence1, sentence2, gold_label; id = pairID).
  hf        the Hugging Face export, .parquet or JSON lines (premise, hypothesis, label 0/1/2, id = idx).
A gold label "-" (the annotators reached no majority) leaves the example out, counted as filtered.

Scored by accuracy per split (matched, mismatched) of the constrained choice (the highest-likelihood label
word) and of free generation.
"""

from __future__ import annotations

import csv
import os

from lora_ds.errors import UserError
from lora_ds.tasks import reading
from lora_ds.tasks.reading import BadRecord, Loc, attempt, field, record_id, text

NAME = "mnli"
# In this order they are the Hugging Face label ids 0, 1, 2.
LABELS = ("entailment", "neutral", "contradiction")
TEMPLATE = {
    "name": NAME,
    "version": 1,
    "prompt": "Premise: {premise}\nHypothesis: {hypothesis}\nLabel:",
    "completion": " {label}",
    "labels": list(LABELS),
}
MAX_NEW_TOKENS = 8
TABLE_COLUMNS = ("n", "accuracy_constrained", "accuracy_generated", "unparsed_generated")
# The dev files' names say which they are; "mismatched" holds "matched", so it is tried first.
SPLIT_NAMES = ("mismatched", "matched")
CHOICES = {label: TEMPLATE["completion"].format(label=label) for label in LABELS}
OFFICIAL = None

GLUE, ORIGINAL, HF = "glue", "original", "hf"
NO_MAJORITY = "-"
EXPECTED = (
    "GLUE's MNLI .tsv, MultiNLI's multinli_1.0_*.jsonl (sentence1, sentence2, gold_label) or the "
    "Hugging Face export (.parquet or .jsonl with premise, hypothesis, label)"
)


# ---- the template ----------------------------------------------------------------------------------


def render(record: dict) -> tuple[str, str]:
    """(prompt, completion) of `{"premise", "hypothesis", "label"}`, label one of LABELS."""
    prompt = TEMPLATE["prompt"].format(premise=record["premise"], hypothesis=record["hypothesis"])
    return prompt, TEMPLATE["completion"].format(label=record["label"])


def answer(record: dict) -> str:
    """The gold label word."""
    return record["label"]


def parse(prediction: str, record: dict) -> str | None:
    """The label word a completion names, or None when it names none."""
    word = prediction.strip()
    return word if word in LABELS else None


# ---- reading the downloaded files ------------------------------------------------------------------


def detect(path: str) -> tuple[str, list[str]]:
    """(format, files read) of an MNLI file."""
    name = os.path.basename(path)
    if name.endswith(".tsv"):
        header = reading.delimited_header(path, "\t", csv.QUOTE_NONE)
        reading.check_columns(path, header, ("sentence1", "sentence2"), EXPECTED)
        if "gold_label" not in header:
            raise UserError(
                f"--src {path}: no gold_label column (GLUE's test files are unlabeled); prepare "
                "train.tsv, dev_matched.tsv or dev_mismatched.tsv"
            )
        return GLUE, [path]
    if name.endswith(".parquet"):
        reading.check_columns(path, reading.parquet_columns(path), ("premise", "hypothesis", "label"), EXPECTED)
        return HF, [path]
    if name.endswith((".jsonl", ".json")):
        loc, first = reading.first_jsonl_record(path)
        if "sentence1" in first:
            return ORIGINAL, [path]
        if "premise" in first:
            return HF, [path]
        raise UserError(f"{loc}: a record with fields {', '.join(sorted(first))}; expected {EXPECTED}")
    raise UserError(f"--src {path}: not an MNLI file; expected {EXPECTED}")


def read(path: str, fmt: str):
    """(Loc, record or None or BadRecord) per example; a record is {id, premise, hypothesis, label}."""
    if fmt == GLUE:
        for loc, raw in reading.read_delimited(path, "\t", csv.QUOTE_NONE):
            yield loc, attempt(_from_sentences, loc, raw, "")
    elif fmt == ORIGINAL:
        for loc, raw in reading.read_jsonl(path):
            yield loc, attempt(_from_sentences, loc, raw, "MultiNLI")
    else:
        for loc, raw in reading.read_export(path):
            yield loc, attempt(_from_hf, loc, raw)


def _from_sentences(loc: Loc, raw: dict, layout: str) -> dict | None:
    """A GLUE TSV row or a MultiNLI JSON line (`layout` names the latter, to spot a mixed file)."""
    if layout and "sentence1" not in raw and "premise" in raw:
        raise reading.mixed(loc, "Hugging Face export's", "MultiNLI")
    premise, hypothesis = text(raw, "sentence1", loc), text(raw, "sentence2", loc)
    label = field(raw, "gold_label", loc, (str,), "a label word")
    if label == NO_MAJORITY:
        return None
    if label not in LABELS:
        raise BadRecord(
            f"{loc}: field 'gold_label' is {label!r}, not one of {', '.join(LABELS)} (or {NO_MAJORITY} for no majority)"
        )
    return {"id": record_id(raw, "pairID", loc), "premise": premise, "hypothesis": hypothesis, "label": label}


def _from_hf(loc: Loc, raw: dict) -> dict:
    if "premise" not in raw and "sentence1" in raw:
        raise reading.mixed(loc, "MultiNLI", "Hugging Face export's")
    premise, hypothesis = text(raw, "premise", loc), text(raw, "hypothesis", loc)
    label = field(raw, "label", loc, (int,), "0, 1 or 2")
    if label == -1:
        raise BadRecord(
            f"{loc}: field 'label' is -1, no label (GLUE's test split is unlabeled); prepare the "
            "train or validation files"
        )
    if not 0 <= label < len(LABELS):
        raise BadRecord(f"{loc}: field 'label' is {label}, not 0, 1 or 2 ({', '.join(LABELS)})")
    return {"id": record_id(raw, "idx", loc), "premise": premise, "hypothesis": hypothesis, "label": LABELS[label]}


# ---- scoring ---------------------------------------------------------------------------------------


def eval_context(sources: list[tuple[str, str]]) -> None:
    """Nothing: a label is scored against the record alone."""
    return None


def score_example(prediction: str, record: dict, context: None, choice: str | None = None) -> dict:
    """{"generated_label", "generated", "constrained"?}: 1/0 per way of predicting (`choice`: the label word
    chosen by likelihood)."""
    word = parse(prediction, record)
    score = {"generated_label": word, "generated": int(word == answer(record))}
    if choice is not None:
        score["constrained"] = int(choice == answer(record))
    return score


def aggregate(scores: list[dict], context: None) -> dict:
    """A split's accuracies (%) and the generations that named no label."""
    n = len(scores)
    out = {
        "n": n,
        "accuracy_generated": 100.0 * sum(s["generated"] for s in scores) / n,
        "unparsed_generated": sum(s["generated_label"] is None for s in scores),
    }
    if all("constrained" in s for s in scores):
        out["accuracy_constrained"] = 100.0 * sum(s["constrained"] for s in scores) / n
    return out
