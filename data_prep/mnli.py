"""Prepare MNLI (premise + hypothesis -> entailment / neutral / contradiction) from the downloaded files.

    python -m data_prep.mnli --src glue_data/MNLI/train.tsv --tokenizer /models/llama-7b --out prepared/mnli
    python -m data_prep.mnli --src glue_data/MNLI/dev_matched.tsv --split dev_matched --tokenizer ... --out ...
    lora-ds prep mnli --src multinli_1.0/multinli_1.0_train.jsonl --tokenizer /models/llama-7b --out prepared/mnli

The formats it reads and the template are lora_ds/tasks/mnli.py's; --help shows them.
"""

import sys

from data_prep.common import main

if __name__ == "__main__":
    sys.exit(main("mnli", __doc__))
