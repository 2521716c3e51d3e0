"""Prepare WikiSQL (table schema + question -> SQL) from the downloaded files, offline.

    python -m data_prep.wikisql --src data/train.jsonl --tokenizer /models/llama-7b --out prepared/wikisql
    python -m data_prep.wikisql --src data/dev.jsonl --split dev --tokenizer /models/llama-7b --out prepared/wikisql-dev
    lora-ds prep wikisql --src wikisql/train-*.parquet --tokenizer /models/llama-7b --out prepared/wikisql

The formats it reads and the template are lora_ds/tasks/wikisql.py's; --help shows them.
"""

import sys

from data_prep.common import main

if __name__ == "__main__":
    sys.exit(main("wikisql", __doc__))
