"""Prepare SAMSum (dialogue -> summary) from the downloaded files, offline.

    python -m data_prep.samsum --src corpus/train.json --tokenizer /models/llama-7b --out prepared/samsum
    lora-ds prep samsum --src samsum/test.csv --split test --tokenizer /models/llama-7b --out prepared/samsum-test

The formats it reads and the template are lora_ds/tasks/samsum.py's; --help shows them.
"""

import sys

from data_prep.common import main

if __name__ == "__main__":
    sys.exit(main("samsum", __doc__))
