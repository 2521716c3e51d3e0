"""Prepare chat and instruction data (messages, ShareGPT, Alpaca, prompt/completion), offline.

    python -m data_prep.chat --src sharegpt.jsonl --tokenizer /models/qwen2.5-7b-instruct --out prepared/chat
    lora-ds prep chat --src alpaca_data.json --tokenizer /models/llama-7b --template alpaca --out prepared/alpaca
    lora-ds prep chat --src data/train-*.parquet --tokenizer /models/llama-3-8b-instruct --pack 4096 --out ...

The layouts it reads and how turns are rendered and masked are lora_ds/tasks/chat.py's; --help shows them.
"""

import sys

from data_prep.common import main

if __name__ == "__main__":
    sys.exit(main("chat", __doc__))
