"""The paper's tasks: one template per task, shared by data prep (rendering) and evaluation (parsing).

Each task module has `NAME`, `TEMPLATE` (the prompt and completion text with a version, recorded in
every prepared dir's manifest) and `render(record) -> (prompt, completion)` over the normalized
records that `data_prep` reads from the downloaded files.
"""
from __future__ import annotations

import importlib

TASKS = ("wikisql", "mnli", "samsum")


def get_task(name: str):
    """The module of task `name` (one of TASKS)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(f"lora_ds.tasks.{name}")
