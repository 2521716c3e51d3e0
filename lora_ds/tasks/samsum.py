"""SAMSum (Gliwa et al. 2019): a chat dialogue in, its summary out.

Formats, told from the file name and its first character or header:
  corpus    the corpus release: one JSON list of {id, dialogue, summary} (train.json, val.json, test.json);
  csv       the CSV mirror (id, dialogue, summary; dialogues hold newlines and commas, so quoted fields);
  hf        the Hugging Face export, .parquet or JSON lines (id, dialogue, summary).
Line endings inside dialogues are mixed. The dialogue is split into utterances at its line breaks (`\\r\\n`,
`\\r` or `\\n`); empty lines are dropped and each utterance is kept verbatim, as is the summary.

Scored by ROUGE F1 x 100 (mean over examples) from the `rouge-score` package with its Porter stemmer;
rouge1/2/L see the text as one sequence, rougeLsum is summary-level LCS over sentences split by NLTK's
Punkt (its trained English model when installed, else the untrained algorithm; the report names which).
"""

from __future__ import annotations

import csv
import os
import re

from lora_ds.errors import UserError
from lora_ds.tasks import reading
from lora_ds.tasks.reading import Loc, attempt, record_id, text

NAME = "samsum"
TEMPLATE = {
    "name": NAME,
    "version": 1,
    "prompt": "{utterances}\n\n",
    "completion": "{summary}",
    "utterances": "the dialogue's non-empty lines (split at \\r\\n, \\r or \\n) joined by \\n",
}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_NOTE = (
    "ROUGE F1 x100 (mean over examples), rouge-score package, Porter stemming on; rouge1/rouge2/rougeL "
    "over the whole text, rougeLsum summary-level LCS over sentences"
)
MAX_NEW_TOKENS = 128
TABLE_COLUMNS = ("n", *ROUGE_TYPES)
SPLIT_NAMES = ()
CHOICES = None
OFFICIAL = None

CORPUS, CSV, HF = "corpus", "csv", "hf"
COLUMNS = ("dialogue", "summary")
EXPECTED = (
    "the SAMSum corpus .json list, the CSV mirror (.csv with id, dialogue, summary) or the Hugging "
    "Face export (.parquet or .jsonl with id, dialogue, summary)"
)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# ---- the template ----------------------------------------------------------------------------------


def utterances(dialogue: str) -> list[str]:
    """The non-empty lines of a dialogue, verbatim."""
    return [line for line in _LINE_BREAK.split(dialogue) if line]


def render(record: dict) -> tuple[str, str]:
    """(prompt, completion) of `{"dialogue", "summary"}`."""
    prompt = TEMPLATE["prompt"].format(utterances="\n".join(utterances(record["dialogue"])))
    return prompt, TEMPLATE["completion"].format(summary=record["summary"])


def answer(record: dict) -> str:
    """The reference summary, stripped (as eval shows it)."""
    return record["summary"].strip()


def parse(prediction: str, record: dict) -> str:
    """A summary is its own answer: ROUGE reads the text as it is."""
    return prediction


# ---- reading the downloaded files ------------------------------------------------------------------


def detect(path: str) -> tuple[str, list[str]]:
    """(format, files read) of a SAMSum file."""
    name = os.path.basename(path)
    if name.endswith(".csv"):
        header = reading.delimited_header(path, ",", csv.QUOTE_MINIMAL)
        reading.check_columns(path, header, COLUMNS, EXPECTED)
        return CSV, [path]
    if name.endswith(".parquet"):
        reading.check_columns(path, reading.parquet_columns(path), COLUMNS, EXPECTED)
        return HF, [path]
    if name.endswith(".json") and reading.first_char(path) == "[":
        return CORPUS, [path]
    if name.endswith((".jsonl", ".json")):
        loc, first = reading.first_jsonl_record(path)
        if all(key in first for key in COLUMNS):
            return HF, [path]
        raise UserError(f"{loc}: a record with fields {', '.join(sorted(first))}; expected {EXPECTED}")
    raise UserError(f"--src {path}: not a SAMSum file; expected {EXPECTED}")


def read(path: str, fmt: str):
    """(Loc, record or BadRecord) per dialogue; a record is {id, dialogue, summary}."""
    if fmt == CORPUS:
        rows = reading.read_json_array(path)
    elif fmt == CSV:
        rows = reading.read_delimited(path, ",", csv.QUOTE_MINIMAL)
    else:
        rows = reading.read_export(path)
    for loc, raw in rows:
        yield loc, attempt(_normalize, loc, raw)


def _normalize(loc: Loc, raw: dict) -> dict:
    return {
        "id": record_id(raw, "id", loc),
        "dialogue": text(raw, "dialogue", loc),
        "summary": text(raw, "summary", loc),
    }


# ---- scoring ---------------------------------------------------------------------------------------

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


def eval_context(sources: list[tuple[str, str]]) -> Rouge:
    """The ROUGE scorer (loaded once: the stemmer and sentence splitter)."""
    return Rouge()


def score_example(prediction: str, record: dict, rouge: Rouge, choice=None) -> dict:
    """ROUGE-1/2/L/Lsum F1 x 100 of one summary against the reference."""
    return rouge(parse(prediction, record), answer(record))


def aggregate(scores: list[dict], rouge: Rouge) -> dict:
    """A split's mean ROUGE F1 x 100, with the note on how it was computed."""
    n = len(scores)
    out = {"n": n, "note": rouge.note}
    for k in ROUGE_TYPES:
        out[k] = sum(s[k] for s in scores) / n
    return out
