"""Prepare WikiSQL, MNLI, SAMSum or chat data from the downloaded files: render, tokenize, mask, pack, save.

    lora-ds prep wikisql --src data/wikisql/train.jsonl --tokenizer /models/llama-7b --out prepared/wikisql
    lora-ds prep mnli --src glue_data/MNLI/dev_matched.tsv --split dev_matched --tokenizer /models/llama-7b \
        --out prepared/mnli-dev
    lora-ds prep samsum --src samsum/train.json --tokenizer /models/llama-7b/tokenizer.model \
        --out prepared/samsum --max_len 1024 --pack 2048 --num_proc 8
    lora-ds prep chat --src sharegpt.jsonl --tokenizer /models/qwen2.5-7b-instruct --out prepared/chat --pack 4096
    lora-ds prep chat --src alpaca_data.json --tokenizer /models/llama-7b --template alpaca --out prepared/alpaca

Writes a prepared dir (one split, `datasets` Arrow + manifest.json) that training reads with --data;
the same input gives the same bytes. Formats per task: `python -m data_prep.TASK --help`.
"""

from __future__ import annotations

from data_prep import common
from lora_ds.tasks import PREP_TASKS


def add_arguments(parser) -> None:
    parser.add_argument("task", choices=PREP_TASKS, help="which task's files --src holds (chat: chat/instruction data)")
    common.add_arguments(parser)


def run(args) -> int:
    return common.run(args.task, args)
