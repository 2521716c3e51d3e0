"""Prepare WikiSQL, MNLI or SAMSum from the downloaded files: render, tokenize, mask, pack, save.

    lora-ds prep wikisql --src data/wikisql/train.jsonl --tokenizer /models/llama-7b --out prepared/wikisql
    lora-ds prep mnli --src glue_data/MNLI/dev_matched.tsv --split dev_matched --tokenizer /models/llama-7b \
        --out prepared/mnli-dev
    lora-ds prep samsum --src samsum/train.json --tokenizer /models/llama-7b/tokenizer.model \
        --out prepared/samsum --max_len 1024 --pack 2048 --num_proc 8

Writes a prepared dir (one split, `datasets` Arrow + manifest.json) that training reads with --data;
the same input gives the same bytes. Formats per task: `python -m data_prep.TASK --help`.
"""

from __future__ import annotations

from data_prep import common
from lora_ds.tasks import TASKS


def add_arguments(parser) -> None:
    parser.add_argument("task", choices=TASKS, help="which task's files --src holds")
    common.add_arguments(parser)


def run(args) -> int:
    return common.run(args.task, args)
