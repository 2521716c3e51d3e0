"""What an evaluation is: a task's examples read from its raw files, predictions scored, the outputs written.

Examples come from the files users download, read by `data_prep.<task>` and rendered by
`lora_ds.tasks.<task>`: the prompts are the text the model was trained on. Used by `lora-ds eval`,
`lora-ds score` and the generation eval during training.

Outputs of one evaluation, in its --out dir:
    predictions.jsonl    one line per example: id, split, prompt, prediction, reference, score
                         (MNLI adds the constrained choice)
    predictions.official.jsonl   WikiSQL without --limit: the official evaluator's format, one line per
                         source line
    metrics.json         task, metrics per split, settings
"""
from __future__ import annotations

import importlib
import json
import os
import random
import re
from dataclasses import dataclass

from lora_ds import metrics
from lora_ds.errors import UserError
from lora_ds.fsutil import read_jsonl, write_json, write_text
from lora_ds.tasks import TASKS, get_task
from lora_ds.tasks.wikisql import parse_sql

DEFAULT_MAX_NEW_TOKENS = {"wikisql": 128, "mnli": 8, "samsum": 128}
# Which numbers the printed table shows, per task, in order.
TABLE_COLUMNS = {
    "wikisql": ("n", "lf_accuracy", "ex_accuracy", "unparsed", "gold_exec_errors"),
    "mnli": ("n", "accuracy_constrained", "accuracy_generated", "unparsed_generated"),
    "samsum": ("n", *metrics.ROUGE_TYPES),
}


@dataclass
class Example:
    id: str
    split: str
    prompt: str
    reference: str  # the gold completion, stripped
    record: dict  # the normalized record (WikiSQL adds its table id)
    line: int  # its place among the non-blank source lines of all --data files (from 0)


@dataclass
class EvalSet:
    task: str
    examples: list[Example]
    sources: list[str]
    tables: metrics.WikiSQLTables | None = None
    source_lines: int = 0  # non-blank lines of all --data files: the official WikiSQL format has one each

    def sample(self, n: int, seed: int) -> "EvalSet":
        """`n` examples drawn with `seed` (kept in source order); all of them if there are no more."""
        if n >= len(self.examples):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.examples)), n))
        return EvalSet(self.task, [self.examples[i] for i in keep], self.sources, self.tables, self.source_lines)


def split_name(path: str, task: str) -> str:
    """A split's name from its file name: MNLI's files are 'matched' or 'mismatched'; else the name without
    its extension and shard suffix (dev.jsonl -> dev, validation-00000-of-00001.parquet -> validation)."""
    name = re.sub(r"\.(jsonl|json|tsv|csv|parquet)$", "", os.path.basename(path))
    if task == "mnli" and "mismatched" in name:
        return "mismatched"
    if task == "mnli" and "matched" in name:
        return "matched"
    return re.sub(r"-\d+-of-\d+$", "", name)


def _wikisql_tables(path: str, fmt: str) -> tuple[dict, dict]:
    """({Loc: table id}, {table id: {header, types, rows}}) of a WikiSQL file: the table rows that
    data_prep.wikisql (which renders prompts only) does not keep, needed to execute queries."""
    from data_prep import common, wikisql

    by_loc, tables = {}, {}
    if fmt == wikisql.ORIGINAL:
        tables_path = wikisql.tables_file(path)
        for loc, raw in common.read_jsonl(tables_path):
            if isinstance(raw, common.BadRecord) or not isinstance(raw.get("rows"), list):
                raise UserError(f"{loc}: a table needs a list field 'rows' to execute queries; fix {tables_path}")
            tables[raw["id"]] = {"header": raw["header"], "types": raw["types"], "rows": raw["rows"]}
        for loc, raw in common.read_jsonl(path):
            by_loc[loc] = None if isinstance(raw, common.BadRecord) else raw.get("table_id")
        return by_loc, tables
    rows = common.read_parquet(path) if path.endswith(".parquet") else common.read_jsonl(path)
    for loc, raw in rows:
        table = raw.get("table") if isinstance(raw, dict) else None
        if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
            raise UserError(f"{loc}: field 'table.rows' is missing; execution accuracy needs the table's rows")
        table_id = str(table.get("id") or loc.default_id)
        tables[table_id] = {"header": table["header"], "types": table["types"], "rows": table["rows"]}
        by_loc[loc] = table_id
    return by_loc, tables


def load_eval_set(task: str, paths: list[str], splits: list[str] | None = None,
                  limit: int | None = None) -> EvalSet:
    """The examples of `paths` (raw task files of any format data_prep reads), `limit` per file.

    Records the source marks unusable (MNLI's '-' label) are left out; a malformed record is an error.
    """
    if task not in TASKS:
        raise UserError(f"--task {task}: choose one of {', '.join(TASKS)}")
    if splits and len(splits) != len(paths):
        raise UserError(f"--split: give one name per --data file ({len(paths)}), got {len(splits)}")
    reader = importlib.import_module(f"data_prep.{task}")
    template = get_task(task)
    examples, sources, all_tables, lines = [], [], {}, 0  # lines: non-blank source lines read so far
    for k, path in enumerate(paths):
        if not os.path.isfile(path):
            raise UserError(f"--data {path}: no such file")
        fmt, files = reader.detect(path)
        sources += files
        split = splits[k] if splits else split_name(path, task)
        read = list(reader.read(path, fmt))
        for _, record in read:
            if isinstance(record, Exception):
                raise UserError(f"{record}; evaluation needs every record of --data {path} to be valid")
        if task == "wikisql":  # read once the reader has checked every record
            by_loc, tables = _wikisql_tables(path, fmt)
            all_tables.update(tables)
        taken, n_lines = 0, 0
        for loc, record in read:
            n_lines += 1
            if record is None or (limit is not None and taken >= limit):
                continue
            if task == "wikisql":
                record = dict(record, table_id=by_loc[loc])
            prompt, completion = template.render(record)
            examples.append(Example(record["id"], split, prompt, completion.strip(), record, lines + n_lines - 1))
            taken += 1
        if taken == 0:
            raise UserError(f"--data {path}: no examples to evaluate")
        lines += n_lines
    keys = [(e.split, e.id) for e in examples]
    if len(set(keys)) != len(keys):
        raise UserError(f"--data {' '.join(paths)}: example ids repeat within a split; give each file its own "
                        "--split name")
    tables = metrics.WikiSQLTables(all_tables) if task == "wikisql" else None
    return EvalSet(task, examples, sources, tables, lines)


# ---- scoring -------------------------------------------------------------------------------------------------

def score(evalset: EvalSet, predictions: list, constrained: list[str] | None = None) -> tuple[list[dict], dict]:
    """(one output row per example, {split: metrics}) of predictions aligned with `evalset.examples`.

    A prediction is text, or for WikiSQL also an official-format record. MNLI's `constrained` are the
    label words chosen by likelihood.
    """
    task = evalset.task
    rouge = metrics.Rouge() if task == "samsum" else None
    rows, by_split = [], {}
    for k, (ex, pred) in enumerate(zip(evalset.examples, predictions)):
        row = {"id": ex.id, "split": ex.split, "prompt": ex.prompt, "prediction": pred, "reference": ex.reference}
        if task == "wikisql":
            row["score"] = metrics.score_wikisql_example(pred, ex.record, evalset.tables)
        elif task == "mnli":
            choice = constrained[k] if constrained is not None else None
            row["score"] = metrics.score_mnli_example(pred, ex.record["label"], choice)
            if choice is not None:
                row["constrained"] = choice
        else:
            row["score"] = rouge(pred, ex.reference)
        rows.append(row)
        by_split.setdefault(ex.split, []).append(row["score"])
    aggregate = {"wikisql": metrics.aggregate_wikisql, "mnli": metrics.aggregate_mnli,
                 "samsum": lambda scores: metrics.aggregate_rouge(scores, rouge.note)}[task]
    return rows, {split: aggregate(scores) for split, scores in by_split.items()}


def label_completions(task: str) -> list[str] | None:
    """The completions MNLI's constrained choice ranks (the template's label words); None for other tasks."""
    if task != "mnli":
        return None
    template = get_task(task)
    return [template.TEMPLATE["completion"].format(label=label) for label in template.LABELS]


def predict(model, tok, evalset: EvalSet, *, max_new_tokens: int, num_beams: int = 1, batch_size: int = 8,
            max_len: int = 1024, device=None, rank: int = 0, world: int = 1,
            progress: bool = True) -> tuple[list[str], list[str] | None]:
    """(generated text per example, MNLI's constrained label per example or None). Collective if world > 1."""
    from lora_ds.generate import completion_logprobs, generate

    prompts = [e.prompt for e in evalset.examples]
    common = dict(batch_size=batch_size, device=device, rank=rank, world=world, progress=progress)
    generated = generate(model, tok, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                         max_prompt_len=max(1, max_len - max_new_tokens), desc=f"{evalset.task} generate", **common)
    generated = [text.strip() for text in generated]
    choices = label_completions(evalset.task)
    if choices is None:
        return generated, None
    logprobs = completion_logprobs(model, tok, prompts, choices, max_len=max_len, desc="mnli labels", **common)
    labels = get_task("mnli").LABELS
    return generated, [labels[max(range(len(labels)), key=lambda j: lp[j])] for lp in logprobs]


# ---- predictions files ---------------------------------------------------------------------------------------

def _is_official(record: dict) -> bool:
    return "query" in record or ("error" in record and "prediction" not in record)


def read_predictions(path: str, evalset: EvalSet) -> tuple[list, list[str] | None]:
    """Predictions of a file, aligned with `evalset.examples`; (predictions, constrained or None).

    JSONL with `id` and `prediction` (and `split` when ids repeat across splits, `constrained` for MNLI's
    likelihood choice), matched by id; for WikiSQL also the official evaluator's format, matched by line.
    """
    if not os.path.isfile(path):
        raise UserError(f"--predictions {path}: no such file")
    records = list(read_jsonl(path))
    if not records:
        raise UserError(f"--predictions {path}: the file has no predictions")
    if evalset.task == "wikisql" and _is_official(records[0][1]):
        return _official_predictions(path, records, evalset), None
    by_key, by_id = {}, {}
    for lineno, record in records:
        if not isinstance(record.get("id"), (str, int)) or not isinstance(record.get("prediction"), str):
            raise UserError(f"{path}:{lineno}: each line needs 'id' and 'prediction' (a string)"
                            + (", or the official WikiSQL format {\"query\": ..., \"error\": \"\"}"
                               if evalset.task == "wikisql" else ""))
        by_key[(record.get("split"), str(record["id"]))] = record
        by_id.setdefault(str(record["id"]), []).append(record)
    found = []
    for ex in evalset.examples:
        record = by_key.get((ex.split, ex.id))
        if record is None:
            candidates = by_id.get(ex.id, [])
            if len(candidates) > 1:
                raise UserError(f"{path}: id {ex.id!r} appears on several lines; add a 'split' field "
                                f"({ex.split!r} for this example)")
            if not candidates:
                raise UserError(f"{path}: no prediction for id {ex.id!r} (split {ex.split}); predict every example "
                                "of --data, or pass the same --limit as the run that wrote it")
            record = candidates[0]
        found.append(record)
    constrained = None
    if evalset.task == "mnli" and all(isinstance(r.get("constrained"), str) for r in found):
        constrained = [r["constrained"] for r in found]
    return [r["prediction"] for r in found], constrained


def _official_predictions(path: str, records: list, evalset: EvalSet) -> list:
    expected = evalset.source_lines
    if len(records) != expected:
        raise UserError(f"{path}: {len(records)} lines in the official WikiSQL format, but --data has {expected} "
                        "questions; the format needs one line per source line, in order")
    by_example = []
    for lineno, record in records:
        if not isinstance(record.get("query"), dict) and not record.get("error"):
            raise UserError(f"{path}:{lineno}: expected {{\"query\": {{\"sel\", \"agg\", \"conds\"}}, "
                            "\"error\": \"\"}")
        by_example.append(record)
    return [by_example[ex.line] for ex in evalset.examples]


def official_record(prediction: str, header: list[str]) -> dict:
    """A text prediction in the official WikiSQL evaluator's format."""
    try:
        sel, agg, conds = parse_sql(prediction, header)
    except ValueError as e:
        return {"query": {}, "error": str(e)}
    return {"query": {"sel": sel, "agg": agg, "conds": [list(c) for c in conds]}, "error": ""}


# ---- outputs -------------------------------------------------------------------------------------------------

def write_outputs(out_dir: str, evalset: EvalSet, rows: list[dict], report: dict) -> None:
    """predictions.jsonl, metrics.json (and WikiSQL's official-format predictions) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    write_text(os.path.join(out_dir, "predictions.jsonl"),
               "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    # The official format has one line per source line: written when every line was evaluated.
    if evalset.task == "wikisql" and len(rows) == evalset.source_lines and \
            all(isinstance(r["prediction"], str) for r in rows):
        lines = [official_record(r["prediction"], ex.record["header"]) for r, ex in zip(rows, evalset.examples)]
        write_text(os.path.join(out_dir, "predictions.official.jsonl"),
                   "".join(json.dumps(line) + "\n" for line in lines))
    write_json(os.path.join(out_dir, "metrics.json"), report)


def format_table(task: str, by_split: dict) -> str:
    """The metrics as an aligned text table, one row per split."""
    columns = TABLE_COLUMNS[task]
    cells = [["split", *columns]]
    for split, values in by_split.items():
        cells.append([split] + [f"{values[c]:.2f}" if isinstance(values.get(c), float) else str(values.get(c, "-"))
                                for c in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    notes = {values["note"] for values in by_split.values() if "note" in values}
    lines += sorted(notes)
    return "\n".join(lines)


class TaskEval:
    """Generation eval during training: a fixed, seeded sample of a task's validation file, generated greedily
    by the live model (LoRA unmerged, ZeRO-3 ranks in lockstep; up to the longest reference + 16 tokens) and
    scored with the task's metrics.

    Each call writes OUTPUT/eval/<step>/ (predictions.jsonl, metrics.json) and returns flat metrics for
    metrics.jsonl (`eval_<task>_<metric>`) on rank 0, {} elsewhere.
    """

    def __init__(self, spec: str, samples: int, seed: int, tok, *, max_len: int, batch_size: int, output_dir: str,
                 rank: int, world: int, device):
        task, _, path = spec.partition(":")
        self.evalset = load_eval_set(task, [path]).sample(samples, seed)
        self.tok, self.max_len, self.batch_size = tok, max_len, batch_size
        self.output_dir, self.rank, self.world, self.device = output_dir, rank, world, device

    def __call__(self, model, step: int) -> dict:
        task = self.evalset.task
        # Enough for the longest reference of the sample plus a margin: an eval in training stays cheap.
        longest = max(len(self.tok.encode(" " + e.reference)) for e in self.evalset.examples)
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS[task], longest + 16, self.max_len - 1)
        generated, constrained = predict(model, self.tok, self.evalset, max_new_tokens=max_new_tokens,
                                         batch_size=self.batch_size, max_len=self.max_len, device=self.device,
                                         rank=self.rank, world=self.world, progress=False)
        if self.rank != 0:
            return {}
        rows, by_split = score(self.evalset, generated, constrained)
        write_outputs(os.path.join(self.output_dir, "eval", f"step_{step:08d}"), self.evalset, rows,
                      {"task": task, "step": step, "metrics": by_split, "data": self.evalset.sources,
                       "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens}})
        (values,) = by_split.values()
        return {f"eval_{task}_{k}": v for k, v in values.items() if k != "note"}
