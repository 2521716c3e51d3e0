"""The tasks, one module each: all that data prep and evaluation know of a task is in its module.

A task module defines these names (data prep and evaluation use no others; tests/test_tasks.py checks them):

    NAME, TEMPLATE        the task's name; its prompt and completion text with a version (in every manifest)
    detect(path)          (format, files read) of a downloaded file, told from its name and content
    read(path, fmt)       (Loc, record or None or BadRecord) per example (lora_ds.tasks.reading); None for one
                          the source itself marks unusable (MNLI's "-" gold label); a record has an "id"
    render(record)        (prompt, completion): the text trained on, and prompted with at evaluation
    answer(record)        the gold answer, in the form its metric compares
    parse(prediction, record)   a prediction's answer in that form; None when it gives none
    eval_context(sources) what scoring needs besides the records, from the (path, format) of each file
                          (WikiSQL's tables; SAMSum's ROUGE scorer), or None
    score_example(prediction, record, context, choice)   one example's score (a dict of numbers)
    aggregate(scores, context)   a split's metrics from its examples' scores
    TABLE_COLUMNS         the metrics printed, in order
    MAX_NEW_TOKENS        the default generation length
    SPLIT_NAMES           split names a file's name may hold (MNLI: mismatched, matched), tried in order
    CHOICES               {label: completion} for a choice by likelihood (MNLI's label words), or None
    OFFICIAL              the task's official evaluator's predictions format (WikiSQL), or None

Adding a task is a module with these names and its line in TASKS.

CHAT (chat.py) is chat and instruction data, prepared for training only: it has NAME, detect and read as above (a
record is {id, messages}), and in place of TEMPLATE and render `chat_template(tokenizer, name)`, the run's
template (the tokenizer's own or a built-in), whose `turns(loc, messages)` are the texts trained on and not.
"""

from __future__ import annotations

import importlib

TASKS = ("wikisql", "mnli", "samsum")  # the paper's: prepared, evaluated and scored
CHAT = "chat"
PREP_TASKS = (*TASKS, CHAT)


def get_task(name: str):
    """The module of task `name` (one of PREP_TASKS)."""
    if name not in PREP_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(PREP_TASKS)}")
    return importlib.import_module(f"lora_ds.tasks.{name}")
