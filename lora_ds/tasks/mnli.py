"""MNLI (Williams et al. 2018): premise + hypothesis in, the label word out."""
from __future__ import annotations

NAME = "mnli"
# In this order they are the Hugging Face label ids 0, 1, 2.
LABELS = ("entailment", "neutral", "contradiction")
TEMPLATE = {
    "name": NAME,
    "version": 1,
    "prompt": "Premise: {premise}\nHypothesis: {hypothesis}\nLabel:",
    "completion": " {label}",
    "labels": list(LABELS),
}


def render(record: dict) -> tuple[str, str]:
    """(prompt, completion) of `{"premise", "hypothesis", "label"}`, label one of LABELS."""
    prompt = TEMPLATE["prompt"].format(premise=record["premise"], hypothesis=record["hypothesis"])
    return prompt, TEMPLATE["completion"].format(label=record["label"])


def parse_label(text: str) -> str | None:
    """The label word a completion names, or None when it names none."""
    word = text.strip()
    return word if word in LABELS else None
