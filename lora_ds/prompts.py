"""What `lora-ds generate` feeds the model: prompts from a flag or a file, encoded with the chat template.

A prompt is text or a conversation: `messages`, [{"role": "system"|"user"|"assistant", "content": str}], a system
turn only first, ending with a user turn. With a chat template, text becomes one user turn (after --system) and the
conversation is rendered by the tokenizer's own `chat_template` with the generation prompt (transformers'
`apply_chat_template`); the rendered text holds its special tokens (BOS too) and is encoded without adding any.
Without one (the tokenizer has none, or --no_template), text is encoded as training encodes a prompt:
[BOS] prompt, `lora_ds.generate.prompt_ids`. Prompts longer than the limit lose tokens from the left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lora_ds.errors import UserError
from lora_ds.fsutil import read_jsonl
from lora_ds.generate import prompt_ids

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """One prompt and where it came from (FILE:LINE, or the flag), for errors."""

    where: str
    text: str | None = None
    messages: tuple | None = None

    def record(self) -> dict:
        """The prompt as the input gave it: {"prompt": text} or {"messages": [...]}."""
        return {"prompt": self.text} if self.messages is None else {"messages": list(self.messages)}


def check_messages(messages, where: str) -> tuple:
    """`messages` as a conversation to generate the next assistant turn of; an error names `where` and the turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(
                f'{where}: messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": text}}, got {m!r}'
            )
        if m["role"] == "system" and i > 0:
            raise UserError(f"{where}: messages[{i}] is a system turn; only the first turn may be one")
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: the last turn is {messages[-1]['role']!r}; end with a user turn to answer")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def read_prompts(path: str) -> list[Prompt]:
    """The prompts of `path`: JSON lines with "prompt" (text) or "messages" (a conversation) when its first
    non-blank line starts with "{", else one text prompt per non-blank line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"--prompts {path}: {e.strerror}") from e
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise UserError(f"--prompts {path}: no prompts in it")
    if not first.lstrip().startswith("{"):
        return [Prompt(f"{path}:{n}", text=line) for n, line in enumerate(lines, 1) if line.strip()]
    prompts = []
    for n, record in read_jsonl(path):
        where = f"{path}:{n}"
        if "messages" in record:
            prompts.append(Prompt(where, messages=check_messages(record["messages"], where)))
        elif isinstance(record.get("prompt"), str):
            prompts.append(Prompt(where, text=record["prompt"]))
        else:
            raise UserError(
                f'{where}: expected "prompt" (text) or "messages" (a conversation), got {json.dumps(record)}'
            )
    return prompts


def chat_renderer(tok, use_template: bool, template: str | None = None):
    """(messages, where) -> prompt text with the generation prompt after it, rendered as `lora-ds prep chat`
    renders training data (lora_ds/tasks/chat.py): the built-in `template`, else the tokenizer's own chat
    template; None for plain prompts (--no_template, or no template to use)."""
    if not use_template or (template is None and not tok.chat_template):
        return None
    from lora_ds.tasks.chat import chat_template

    chat = chat_template(tok, template)
    return lambda messages, where: chat.render(where, messages, generation_prompt=True)


def require_template(tok, use_template: bool, what: str, template: str | None = None) -> None:
    """Refuse `what` (something only a chat template can render) without one, saying why there is none."""
    if chat_renderer(tok, use_template, template) is None:
        why = (
            "--no_template is given"
            if not use_template
            else f"the tokenizer {tok.source} has no chat_template (name a built-in one with --template)"
        )
        raise UserError(f"{what} needs a chat template and {why}")


def encode_prompts(
    tok, prompts: list[Prompt], *, system: str | None, use_template: bool, max_len: int, template: str | None = None
):
    """The ids each prompt generates from, at most `max_len` of them."""
    render = chat_renderer(tok, use_template, template)
    if render is None:
        for p in prompts:
            if p.messages is not None:
                require_template(tok, use_template, f"{p.where}: a conversation", template)
        if system is not None:
            require_template(tok, use_template, "--system", template)
        return [prompt_ids(tok, p.text, max_len) for p in prompts]
    encoded = []
    for p in prompts:
        messages = list(p.messages) if p.messages is not None else [{"role": "user", "content": p.text}]
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        encoded.append(tok.encode_special(render(messages, p.where))[-max_len:])
    return encoded
