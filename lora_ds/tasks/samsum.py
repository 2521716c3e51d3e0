"""SAMSum (Gliwa et al. 2019): a chat dialogue in, its summary out.

The dialogue is split into utterances at its line breaks (`\\r\\n`, `\\r` or `\\n`: the files mix
them); empty lines are dropped and each utterance is kept verbatim. The summary is kept verbatim.
"""
from __future__ import annotations

import re

NAME = "samsum"
TEMPLATE = {
    "name": NAME,
    "version": 1,
    "prompt": "{utterances}\n\n",
    "completion": "{summary}",
    "utterances": "the dialogue's non-empty lines (split at \\r\\n, \\r or \\n) joined by \\n",
}

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def utterances(dialogue: str) -> list[str]:
    """The non-empty lines of a dialogue, verbatim."""
    return [line for line in _LINE_BREAK.split(dialogue) if line]


def render(record: dict) -> tuple[str, str]:
    """(prompt, completion) of `{"dialogue", "summary"}`."""
    prompt = TEMPLATE["prompt"].format(utterances="\n".join(utterances(record["dialogue"])))
    return prompt, TEMPLATE["completion"].format(summary=record["summary"])
