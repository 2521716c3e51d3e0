"""Chat and instruction data: conversations in, every assistant turn trained on, rendered by a chat template.

Layouts, told from the first record's fields (each in a JSON list, JSON lines, Parquet, or a dir written by
`datasets.Dataset.save_to_disk`):
  messages    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} (OpenAI / HF style)
  sharegpt    {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
  alpaca      {"instruction", "input" (may be empty or absent), "output", "system" (optional)}: one exchange whose
              user turn is the instruction, then a blank line and the input when there is one
  prompt_completion   {"prompt", "completion"} (what training reads from JSON lines): one exchange
An optional "id" field names a record (else its file and line). A conversation is an optional system turn, then
user and assistant turns in turn, ending with an assistant turn; contents are non-blank strings, kept verbatim.

Rendered by the tokenizer's own chat template (`chat_template` in its config or chat_template.jinja) through
transformers' chat-template renderer (what `apply_chat_template` runs), or by the built-in --template: chatml,
llama3 (Meta's Llama 3 Instruct template) or alpaca (Stanford Alpaca's prompt, one instruction/response block per
exchange, EOS ending each response); --template overrides the tokenizer's own. The built-ins start with the
tokenizer's BOS when it starts sequences with one. A template that writes today's date (Llama 3.1's) is given a
fixed one (FIXED_DATE), so that the same input gives the same bytes. The manifest records the template's text.

The loss covers every assistant turn through its end-of-turn token (whitespace the template writes after that
token belongs to what follows) and nothing of the system and user turns nor of the template's headers. The
turns are found by rendering the conversation up to each assistant turn (with the generation prompt) and through
it: each rendering must begin with the one before, and each assistant turn must end with a special token of the
tokenizer; a template that breaks either is refused, naming the record. An overlong conversation loses tokens
from the left (its BOS kept), never from its last assistant turn; one whose last assistant turn alone does not fit
is dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lora_ds.errors import UserError
from lora_ds.tasks import reading
from lora_ds.tasks.reading import BadRecord, Loc, attempt, check, field, record_id, text

NAME = "chat"
SPLIT_NAMES = ()

MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION = "messages", "sharegpt", "alpaca", "prompt_completion"
EXPECTED = (
    "records with messages [{role, content}], conversations [{from, value}] (ShareGPT), instruction/input/output "
    "(Alpaca) or prompt/completion, in a .json list, .jsonl, .parquet or a datasets save_to_disk dir"
)


@dataclass(frozen=True)
class Turns:
    """How a layout writes a conversation: the list's field, each turn's role and content fields, its role names."""

    key: str
    role: str
    content: str
    roles: dict  # the layout's role name -> system / user / assistant


TURN_LAYOUTS = {
    MESSAGES: Turns("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    SHAREGPT: Turns("conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}


@dataclass(frozen=True)
class Builtin:
    """A built-in chat template: its Jinja text and the tokens it writes, which the tokenizer must have."""

    jinja: str
    tokens: tuple[str, ...]


BUILTIN = {
    "chatml": Builtin(
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama3": Builtin(  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "alpaca": Builtin(
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{% set loop_messages = messages[1:] %}{% else %}"
        "{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\\n\\n' }}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
        (),
    ),
}
TEMPLATE_VERSION = 1
# Templates that write today's date (Llama 3.1's) read it from date_string when given: the same input, the same bytes.
FIXED_DATE = "26 Jul 2024"


# ---- reading the files -----------------------------------------------------------------------------


def _layout(fields) -> str | None:
    """The layout a record (or a file's columns) is in, from its fields."""
    if "messages" in fields:
        return MESSAGES
    if "conversations" in fields:
        return SHAREGPT
    if "instruction" in fields:
        return ALPACA
    if "prompt" in fields and "completion" in fields:
        return PROMPT_COMPLETION
    return None


def _container(path: str) -> str:
    """How a --src holds its records: "saved" (a save_to_disk dir), "parquet", "list" (one JSON list), "lines"."""
    if os.path.isdir(path):
        return "saved"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".json") and reading.first_char(path) == "[":
        return "list"
    if path.endswith((".json", ".jsonl")):
        return "lines"
    raise UserError(f"--src {path}: not a chat data file; expected {EXPECTED}")


def _rows(path: str):
    kind = _container(path)
    if kind == "saved":
        return reading.read_saved_dataset(path)
    if kind == "parquet":
        return reading.read_parquet(path)
    return reading.read_json_array(path) if kind == "list" else reading.read_jsonl(path)


def detect(path: str) -> tuple[str, list[str]]:
    """(layout, files read) of a chat data file or save_to_disk dir."""
    kind = _container(path)
    if kind == "saved":
        fields, where, files = reading.saved_dataset(path).column_names, path, reading.saved_dataset_files(path)
    elif kind == "parquet":
        fields, where, files = reading.parquet_columns(path), path, [path]
    else:
        first = next(iter(_rows(path)), None)
        if first is None:
            raise UserError(f"{path}: the file has no records")
        if isinstance(first[1], BadRecord):
            raise UserError(f"{first[1]}; the layout of {path} is told from its first record")
        where, fields, files = first[0], sorted(first[1]), [path]
    layout = _layout(fields)
    if layout is None:
        raise UserError(f"{where}: a record with fields {', '.join(sorted(fields))}; expected {EXPECTED}")
    return layout, files


def read(path: str, layout: str):
    """(Loc, record or BadRecord) per conversation; a record is {id, messages: [{role, content}]}."""
    for loc, raw in _rows(path):
        yield loc, attempt(_normalize, loc, raw, layout)


def _normalize(loc: Loc, raw: dict, layout: str) -> dict:
    found = _layout(raw)
    if found not in (None, layout):
        raise reading.mixed(loc, found, layout)
    if layout in TURN_LAYOUTS:
        messages = _turns(loc, raw, TURN_LAYOUTS[layout])
    elif layout == ALPACA:
        messages = _alpaca(loc, raw)
    else:
        messages = [{"role": "user", "content": text(raw, "prompt", loc)}]
        messages.append({"role": "assistant", "content": text(raw, "completion", loc)})
    return {"id": record_id(raw, "id", loc), "messages": messages}


def _turns(loc: Loc, raw: dict, layout: Turns) -> list[dict]:
    """The turns of a messages or ShareGPT record, checked (roles known and in order, contents non-blank)."""
    items = field(raw, layout.key, loc, (list,), "a list of turns")
    messages = []
    for i, item in enumerate(items):
        name = f"{layout.key}[{i}]"
        check(item, loc, name, (dict,), f"an object with '{layout.role}' and '{layout.content}'")
        role = field(item, layout.role, loc, (str,), "a string", f"{name}.{layout.role}")
        if role not in layout.roles:
            raise BadRecord(f"{loc}: field '{name}.{layout.role}' is {role!r}, not one of {', '.join(layout.roles)}")
        content = text(item, layout.content, loc, f"{name}.{layout.content}")
        messages.append({"role": layout.roles[role], "content": content})
    _check_order(loc, messages, layout)
    return messages


def _check_order(loc: Loc, messages: list[dict], layout: Turns) -> None:
    """An optional system turn first, then user and assistant in turn, ending with an assistant turn."""
    called = {ours: theirs for theirs, ours in layout.roles.items()}
    start = int(bool(messages) and messages[0]["role"] == "system")
    for i in range(start, len(messages)):
        due = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != due:
            raise BadRecord(
                f"{loc}: field '{layout.key}[{i}].{layout.role}' is {called[messages[i]['role']]!r} where "
                f"{called[due]!r} is due: turns go ({called['system']},) {called['user']}, {called['assistant']}, "
                f"{called['user']}, {called['assistant']}, ..."
            )
    if len(messages) - start < 2:
        raise BadRecord(f"{loc}: field '{layout.key}' has no {called['assistant']!r} turn: nothing to train on")
    if messages[-1]["role"] != "assistant":
        raise BadRecord(
            f"{loc}: field '{layout.key}[{len(messages) - 1}]' is a {called['user']!r} turn that no "
            f"{called['assistant']!r} turn answers; a conversation ends with an assistant turn"
        )


def _alpaca(loc: Loc, raw: dict) -> list[dict]:
    instruction = text(raw, "instruction", loc)
    extra = raw.get("input")
    if extra is not None:
        check(extra, loc, "input", (str,), "a string (may be empty)")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": text(raw, "output", loc)}]
    system = raw.get("system")
    if system is not None and check(system, loc, "system", (str,), "a string (may be empty)").strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


# ---- the template ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the variables it is rendered with, split into the turns trained on."""

    name: str  # "tokenizer" (its own) or a built-in's name
    jinja: str
    variables: dict  # bos_token, eos_token, ...: the strings the template writes for them
    specials: tuple[str, ...]  # the tokenizer's special tokens: an assistant turn ends with one
    origin: str  # how messages name the template

    @property
    def record(self) -> dict:
        """What the manifest records of the template."""
        return {
            "name": NAME,
            "version": TEMPLATE_VERSION,
            "chat_template": self.name,
            "jinja": self.jinja,
            "variables": dict(sorted(self.variables.items())),
            "alpaca_user_turn": "instruction, or instruction + '\\n\\n' + input when input is not blank",
            "loss": "every assistant turn through its end-of-turn token; nothing of system or user turns",
        }

    def render(self, loc: Loc, messages: list[dict], generation_prompt: bool = False) -> str:
        """The template's text of `messages` (with the assistant header after them, for `generation_prompt`)."""
        from jinja2 import TemplateError, TemplateSyntaxError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.jinja,
                add_generation_prompt=generation_prompt,
                **self.variables,
            )
        except TemplateSyntaxError as e:
            raise UserError(f"{self.origin}: not a valid Jinja template ({e})") from e
        except TemplateError as e:
            raise BadRecord(f"{loc}: {self.origin} refuses this conversation ({e})") from e
        return rendered[0]

    def turns(self, loc: Loc, messages: list[dict]) -> list[tuple[str, bool]]:
        """`[(text, trained)]` of a conversation: the template's text cut where each assistant turn begins and ends,
        up to its last assistant turn's end-of-turn token."""
        out, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(loc, messages[:i], generation_prompt=True)
            through = self.render(loc, messages[: i + 1])
            self._check_prefix(loc, done, before, f"messages[:{i}] with the generation prompt")
            self._check_prefix(loc, before, through, f"messages[:{i + 1}]")
            reply = through[len(before) :].rstrip()
            if not reply.endswith(self.specials):
                raise UserError(
                    f"{loc}: {self.origin} ends the assistant turn messages[{i}] with {reply[-24:]!r}, not with a "
                    "special token of the tokenizer, so the model would not learn where a turn ends; use a template "
                    f"that ends turns with one (--template {'|'.join(BUILTIN)})"
                )
            out += [(before[len(done) :], False), (reply, True)]
            done = before + reply
        return out

    def _check_prefix(self, loc: Loc, head: str, text: str, what: str) -> None:
        if text.startswith(head):
            return
        at = next(k for k, (a, b) in enumerate(zip(head + "\0", text + "\0")) if a != b)
        raise UserError(
            f"{loc}: {self.origin} renders {what} as a text that does not begin with its rendering of the turns "
            f"before ({head[max(0, at - 16) : at + 16]!r} became {text[max(0, at - 16) : at + 16]!r}), so the "
            f"assistant turns cannot be told apart; use another template (--template {'|'.join(BUILTIN)})"
        )


def chat_template(tok, name: str | None = None) -> ChatTemplate:
    """The template a run renders with: the built-in `name`, else the tokenizer's own."""
    specials = tuple(sorted(tok.special_tokens))
    if name is not None:
        missing = [t for t in BUILTIN[name].tokens if t not in tok.special_tokens]
        if missing:
            raise UserError(
                f"--template {name} writes {', '.join(missing)}, which {tok.source} does not have as tokens; use "
                "the model's own tokenizer with them, or --template alpaca (which needs none)"
            )
        variables = {"bos_token": tok.special_tokens_map.get("bos_token", "") if tok.add_bos else ""}
        variables["eos_token"] = tok.special_tokens_map["eos_token"]
        return ChatTemplate(name, BUILTIN[name].jinja, variables, specials, f"--template {name}")
    own = tok.chat_template
    if isinstance(own, dict):  # named templates: the default one
        own = own.get("default")
    if not own:
        raise UserError(
            f"--tokenizer {tok.source}: the tokenizer has no chat template (chat_template in tokenizer_config.json "
            f"or chat_template.jinja); name a built-in one with --template {'|'.join(BUILTIN)}"
        )
    variables = {**tok.special_tokens_map, "date_string": FIXED_DATE}
    return ChatTemplate("tokenizer", own, variables, specials, f"the chat template of {tok.source}")
