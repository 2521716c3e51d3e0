"""What an evaluation is: a task's examples read from its raw files, predictions scored, the outputs written.

Examples come from the files users download, read and rendered by the task's module (`lora_ds.tasks`):
the prompts are the text the model was trained on. Used by `lora-ds eval`, `lora-ds score` and the
generation eval during training.

Outputs of one evaluation, in its --out dir:
    predictions.jsonl    one line per example: id, split, prompt, prediction, reference, score
                         (MNLI adds the constrained choice)
    predictions.official.jsonl   WikiSQL without --limit: the official evaluator's format, one line per
                         source line
    metrics.json         task, metrics per split, settings
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass

from lora_ds.errors import UserError
from lora_ds.fsutil import read_jsonl, write_json, write_text
from lora_ds.tasks import TASKS, get_task


@dataclass
class Example:
    id: str
    split: str
    prompt: str
    reference: str  # the gold completion, stripped
    record: dict  # the record the task's reader gave
    line: int  # its place among the records read from all --data files (from 0)


@dataclass
class EvalSet:
    task: str
    examples: list[Example]
    sources: list[str]
    context: object = None  # what the task's scoring needs besides the records (its eval_context)
    source_lines: int = 0  # records read from all --data files: an official predictions format has one line each

    def sample(self, n: int, seed: int) -> EvalSet:
        """`n` examples drawn with `seed` (kept in source order); all of them if there are no more."""
        if n >= len(self.examples):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.examples)), n))
        return EvalSet(self.task, [self.examples[i] for i in keep], self.sources, self.context, self.source_lines)


def split_name(path: str, task: str) -> str:
    """A split's name from its file name: the first of the task's SPLIT_NAMES in it (MNLI: 'mismatched',
    'matched'); else the name without its extension and shard suffix (dev.jsonl -> dev,
    validation-00000-of-00001.parquet -> validation)."""
    name = re.sub(r"\.(jsonl|json|tsv|csv|parquet)$", "", os.path.basename(path))
    named = [split for split in get_task(task).SPLIT_NAMES if split in name]
    return named[0] if named else re.sub(r"-\d+-of-\d+$", "", name)


def _read_valid(task, path: str, fmt: str) -> list:
    """Every record of a file, None where the source marks one unusable; a malformed record is an error."""
    records = [record for _, record in task.read(path, fmt)]
    for record in records:
        if isinstance(record, Exception):
            raise UserError(f"{record}; evaluation needs every record of --data {path} to be valid")
    return records


def load_eval_set(
    task_name: str, paths: list[str], splits: list[str] | None = None, limit: int | None = None
) -> EvalSet:
    """The examples of `paths` (raw task files of any format data prep reads), `limit` per file.

    Records the source marks unusable (MNLI's '-' label) are left out; a malformed record is an error.
    """
    if task_name not in TASKS:
        raise UserError(f"--task {task_name}: choose one of {', '.join(TASKS)}")
    if splits and len(splits) != len(paths):
        raise UserError(f"--split: give one name per --data file ({len(paths)}), got {len(splits)}")
    task = get_task(task_name)
    examples, sources, formats, lines = [], [], [], 0  # lines: records read so far
    for k, path in enumerate(paths):
        if not os.path.isfile(path):
            raise UserError(f"--data {path}: no such file")
        fmt, files = task.detect(path)
        sources += files
        formats.append((path, fmt))
        split = splits[k] if splits else split_name(path, task_name)
        read = _read_valid(task, path, fmt)
        taken = [(lines + n, record) for n, record in enumerate(read) if record is not None][:limit]
        if not taken:
            raise UserError(f"--data {path}: no examples to evaluate")
        for line, record in taken:
            prompt, completion = task.render(record)
            examples.append(Example(record["id"], split, prompt, completion.strip(), record, line))
        lines += len(read)
    keys = [(e.split, e.id) for e in examples]
    if len(set(keys)) != len(keys):
        raise UserError(
            f"--data {' '.join(paths)}: example ids repeat within a split; give each file its own --split name"
        )
    return EvalSet(task_name, examples, sources, task.eval_context(formats), lines)


# ---- scoring -------------------------------------------------------------------------------------------------


def score(evalset: EvalSet, predictions: list, constrained: list[str] | None = None) -> tuple[list[dict], dict]:
    """(one output row per example, {split: metrics}) of predictions aligned with `evalset.examples`.

    A prediction is text, or a line of the task's official format. `constrained` are the labels chosen by
    likelihood (tasks with CHOICES).
    """
    task = get_task(evalset.task)
    rows, by_split = [], {}
    for k, (ex, pred) in enumerate(zip(evalset.examples, predictions)):
        choice = constrained[k] if constrained is not None else None
        row = {
            "id": ex.id,
            "split": ex.split,
            "prompt": ex.prompt,
            "prediction": pred,
            "reference": ex.reference,
            "score": task.score_example(pred, ex.record, evalset.context, choice),
        }
        if choice is not None:
            row["constrained"] = choice
        rows.append(row)
        by_split.setdefault(ex.split, []).append(row["score"])
    return rows, {split: task.aggregate(scores, evalset.context) for split, scores in by_split.items()}


def predict(
    model,
    tok,
    evalset: EvalSet,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 8,
    max_len: int = 1024,
    device=None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> tuple[list[str], list[str] | None]:
    """(generated text per example, the likeliest of the task's CHOICES per example or None). Collective if
    world > 1."""
    from lora_ds.generate import completion_logprobs, generate

    prompts = [e.prompt for e in evalset.examples]
    common = dict(batch_size=batch_size, device=device, rank=rank, world=world, progress=progress)
    generated = generate(
        model,
        tok,
        prompts,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        max_prompt_len=max(1, max_len - max_new_tokens),
        desc=f"{evalset.task} generate",
        **common,
    )
    generated = [text.strip() for text in generated]
    choices = get_task(evalset.task).CHOICES
    if choices is None:
        return generated, None
    labels = list(choices)
    logprobs = completion_logprobs(
        model, tok, prompts, list(choices.values()), max_len=max_len, desc=f"{evalset.task} labels", **common
    )
    return generated, [labels[max(range(len(labels)), key=lambda j: lp[j])] for lp in logprobs]


# ---- predictions files ---------------------------------------------------------------------------------------


def read_predictions(path: str, evalset: EvalSet) -> tuple[list, list[str] | None]:
    """Predictions of a file, aligned with `evalset.examples`; (predictions, constrained or None).

    JSONL with `id` and `prediction` (and `split` when ids repeat across splits, `constrained` for a choice
    by likelihood), matched by id; or the task's official format (WikiSQL's), matched by line.
    """
    if not os.path.isfile(path):
        raise UserError(f"--predictions {path}: no such file")
    records = list(read_jsonl(path))
    if not records:
        raise UserError(f"--predictions {path}: the file has no predictions")
    task = get_task(evalset.task)
    if task.OFFICIAL is not None and task.OFFICIAL.recognizes(records[0][1]):
        lines = task.OFFICIAL.read(path, records, evalset.source_lines)
        return [lines[ex.line] for ex in evalset.examples], None
    by_key, by_id = {}, {}
    for lineno, record in records:
        if not isinstance(record.get("id"), (str, int)) or not isinstance(record.get("prediction"), str):
            raise UserError(
                f"{path}:{lineno}: each line needs 'id' and 'prediction' (a string)"
                + (f", or {task.OFFICIAL.HINT}" if task.OFFICIAL is not None else "")
            )
        by_key[(record.get("split"), str(record["id"]))] = record
        by_id.setdefault(str(record["id"]), []).append(record)
    found = []
    for ex in evalset.examples:
        record = by_key.get((ex.split, ex.id))
        if record is None:
            candidates = by_id.get(ex.id, [])
            if len(candidates) > 1:
                raise UserError(
                    f"{path}: id {ex.id!r} appears on several lines; add a 'split' field "
                    f"({ex.split!r} for this example)"
                )
            if not candidates:
                raise UserError(
                    f"{path}: no prediction for id {ex.id!r} (split {ex.split}); predict every example "
                    "of --data, or pass the same --limit as the run that wrote it"
                )
            record = candidates[0]
        found.append(record)
    constrained = None
    if task.CHOICES is not None and all(isinstance(r.get("constrained"), str) for r in found):
        constrained = [r["constrained"] for r in found]
    return [r["prediction"] for r in found], constrained


# ---- outputs -------------------------------------------------------------------------------------------------


def write_outputs(out_dir: str, evalset: EvalSet, rows: list[dict], report: dict) -> None:
    """predictions.jsonl, metrics.json (and the task's official-format predictions) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    write_text(
        os.path.join(out_dir, "predictions.jsonl"), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )
    official = get_task(evalset.task).OFFICIAL
    # The official format has one line per source line: written when every line was evaluated.
    if (
        official is not None
        and len(rows) == evalset.source_lines
        and all(isinstance(r["prediction"], str) for r in rows)
    ):
        lines = [official.line(r["prediction"], ex.record) for r, ex in zip(rows, evalset.examples)]
        write_text(os.path.join(out_dir, official.FILE), "".join(json.dumps(line) + "\n" for line in lines))
    write_json(os.path.join(out_dir, "metrics.json"), report)


def format_table(task: str, by_split: dict) -> str:
    """The metrics as an aligned text table, one row per split."""
    columns = get_task(task).TABLE_COLUMNS
    cells = [["split", *columns]]
    for split, values in by_split.items():
        cells.append(
            [split]
            + [f"{values[c]:.2f}" if isinstance(values.get(c), float) else str(values.get(c, "-")) for c in columns]
        )
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

    def __init__(
        self,
        spec: str,
        samples: int,
        seed: int,
        tok,
        *,
        max_len: int,
        batch_size: int,
        output_dir: str,
        rank: int,
        world: int,
        device,
    ):
        task, _, path = spec.partition(":")
        self.evalset = load_eval_set(task, [path]).sample(samples, seed)
        self.tok, self.max_len, self.batch_size = tok, max_len, batch_size
        self.output_dir, self.rank, self.world, self.device = output_dir, rank, world, device

    def __call__(self, model, step: int) -> dict:
        task = self.evalset.task
        # Enough for the longest reference of the sample plus a margin: an eval in training stays cheap.
        longest = max(len(self.tok.encode(" " + e.reference)) for e in self.evalset.examples)
        max_new_tokens = min(get_task(task).MAX_NEW_TOKENS, longest + 16, self.max_len - 1)
        generated, constrained = predict(
            model,
            self.tok,
            self.evalset,
            max_new_tokens=max_new_tokens,
            batch_size=self.batch_size,
            max_len=self.max_len,
            device=self.device,
            rank=self.rank,
            world=self.world,
            progress=False,
        )
        if self.rank != 0:
            return {}
        rows, by_split = score(self.evalset, generated, constrained)
        write_outputs(
            os.path.join(self.output_dir, "eval", f"step_{step:08d}"),
            self.evalset,
            rows,
            {
                "task": task,
                "step": step,
                "metrics": by_split,
                "data": self.evalset.sources,
                "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens},
            },
        )
        (values,) = by_split.values()
        return {f"eval_{task}_{k}": v for k, v in values.items() if k != "note"}
