"""Chat data prep (`lora-ds prep chat`): every layout and container, the tokenizer's own template and the built-in
ones, the loss over each assistant turn (read back by decoding the trained tokens), truncation, packing,
byte-identical output, and bad input named by file, line and field."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from fixtures import (
    CHAT_FIXTURES,
    CHATML_GENERATION,
    chat_data,
    instruction_data,
    save_chat_tokenizer,
    tokenizer_texts,
    train_bpe_tokenizer,
    train_sentencepiece_model,
    write_fixture,
)
from helpers import run_cli

from data_prep import common
from lora_ds.data import IGNORE_INDEX
from lora_ds.errors import UserError
from lora_ds.tasks import chat
from lora_ds.tokenizer import load_tokenizer

END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "<|endoftext|>"}  # each template's end of turn


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, str]:
    """own: ChatML tokens and its own ChatML template; plain: no template, no chat tokens; sp: SentencePiece."""
    root = tmp_path_factory.mktemp("chat_tokenizers")
    return {
        "own": str(save_chat_tokenizer(root / "own")),
        "plain": str(train_bpe_tokenizer(tokenizer_texts(), root / "plain")),
        "sp": str(train_sentencepiece_model(tokenizer_texts(), root / "sp" / "tokenizer.model")),
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("chat_fixtures")
    return {name: [str(p) for p in write_fixture(name, root / name)] for name in CHAT_FIXTURES}


def prep(src, tokenizer, out, **kw) -> dict:
    manifest, _ = common.prepare(
        common.Settings(task="chat", src=[str(p) for p in src], tokenizer=tokenizer, out=str(out), **kw)
    )
    return manifest


def load(out):
    from datasets import load_from_disk

    return load_from_disk(str(out))


def hf(tokenizer: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)


def trained_runs(row: dict) -> list[list[int]]:
    """The row's runs of consecutive tokens the loss covers."""
    runs, previous = [], False
    for token, label in zip(row["input_ids"], row["labels"]):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = trained
    return runs


def expected_messages(name: str) -> list[list[dict]]:
    """The conversations fixture set `name` holds, in order."""
    layout = CHAT_FIXTURES[name]
    if layout in ("messages", "sharegpt"):
        return [r["messages"] for r in chat_data(40)]
    out = []
    for r in instruction_data(40):
        if layout == "prompt_completion":
            out.append([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}])
            continue
        user = f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]
        system = [{"role": "system", "content": r["system"]}] if "system" in r else []
        out.append([*system, {"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
    return out


def replies(messages: list[dict], template: str = "chatml") -> list[str]:
    """What the loss must cover: each assistant turn's text and the template's end-of-turn token."""
    return [
        (m["content"].strip() if template == "llama3" else m["content"]) + END[template]
        for m in messages
        if m["role"] == "assistant"
    ]


def with_template(toks, tmp_path, jinja: str) -> str:
    out = tmp_path / "tokenizer"
    shutil.copytree(toks["own"], out)
    (out / "chat_template.jinja").write_text(jinja)
    return str(out)


def dir_digest(path) -> dict[str, str]:
    return {name: hashlib.sha256((Path(path) / name).read_bytes()).hexdigest() for name in sorted(os.listdir(path))}


# ---- layouts, containers, templates --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CHAT_FIXTURES))
def test_every_layout_and_container_prepares_its_conversations(name, sources, toks, tmp_path):
    manifest = prep(sources[name], toks["own"], tmp_path / "out")
    tok, rows, want = hf(toks["own"]), load(tmp_path / "out"), expected_messages(name)
    assert len(rows) == len(want) == 40
    for row, messages in zip(rows, want):
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(row["input_ids"]) == rendered.removesuffix("\n")  # ends at the last end-of-turn token
        assert [tok.decode(run) for run in trained_runs(row)] == replies(messages)
        assert row["position_ids"] == list(range(row["length"])) and row["length"] == len(row["input_ids"])
    assert manifest["source_format"] == CHAT_FIXTURES[name] and manifest["task"] == "chat"
    assert manifest["template"]["chat_template"] == "tokenizer" and manifest["template"]["jinja"] == CHATML_GENERATION
    assert manifest["counts"]["read"] == manifest["counts"]["kept"] == manifest["counts"]["rows"] == 40
    files = [s["path"] for s in manifest["sources"]]
    assert len(files) >= (3 if name.endswith("saved") else 1)  # a save_to_disk dir: its shards, info and state
    for source in manifest["sources"]:
        assert source["sha256"] == hashlib.sha256(Path(source["path"]).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "names",
    [
        [
            "chat-messages-jsonl",
            "chat-messages-parquet",
            "chat-messages-saved",
            "chat-sharegpt-json",
            "chat-sharegpt-jsonl",
        ],
        ["chat-alpaca-json", "chat-alpaca-parquet"],
    ],
)
def test_containers_and_layouts_of_the_same_conversations_give_the_same_rows(names, sources, toks, tmp_path):
    columns = []
    for name in names:
        prep(sources[name], toks["own"], tmp_path / name)
        columns.append(load(tmp_path / name).select_columns(["input_ids", "labels"]).to_list())
    assert all(c == columns[0] for c in columns[1:])


def test_the_labels_are_transformers_assistant_mask(sources, toks, tmp_path):
    """The fixture's template marks assistant text with {% generation %}: apply_chat_template's assistant mask of
    each conversation is where prep's labels are not -100 (the text after the last end-of-turn token aside)."""
    prep(sources["chat-sharegpt-jsonl"], toks["own"], tmp_path / "out")
    tok = hf(toks["own"])
    for row, messages in zip(load(tmp_path / "out"), expected_messages("chat-sharegpt-jsonl")):
        theirs = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        n = row["length"]
        assert row["input_ids"] == theirs["input_ids"][:n] and tok.decode(theirs["input_ids"][n:]) == "\n"
        assert [int(label != IGNORE_INDEX) for label in row["labels"]] == theirs["assistant_masks"][:n]


@pytest.mark.parametrize("template", ["chatml", "llama3", "alpaca"])
def test_the_loss_covers_each_assistant_turn_and_its_end_of_turn_token(template, sources, toks, tmp_path):
    manifest = prep(sources["chat-sharegpt-jsonl"], toks["own"], tmp_path / "out", template=template)
    tok = hf(toks["own"])
    jinja = chat.BUILTIN[template].jinja
    for row, messages in zip(load(tmp_path / "out"), expected_messages("chat-sharegpt-jsonl")):
        rendered = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, bos_token="")
        assert tok.decode(row["input_ids"]) == rendered.rstrip()
        runs = trained_runs(row)
        assert [tok.decode(run) for run in runs] == replies(messages, template)
        assert sum(map(len, runs)) == len(row["input_ids"]) - row["labels"].count(IGNORE_INDEX)
    assert manifest["template"]["chat_template"] == template and manifest["template"]["jinja"] == jinja


# The shape of two of today's templates (their tool-call branches left out): Qwen2.5's default system turn, and
# Llama 3.1's system header with today's date, which prep fixes so that the same input gives the same bytes.
QWEN25_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or "
    "(message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA31_STYLE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- endif %}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    "jinja, end", [(QWEN25_STYLE, "chatml"), (LLAMA31_STYLE, "llama3")], ids=["qwen2.5", "llama3.1"]
)
def test_templates_in_the_style_of_todays_models_train_on_their_assistant_turns(jinja, end, sources, toks, tmp_path):
    tokenizer = with_template(toks, tmp_path, jinja)
    prep(sources["chat-messages-jsonl"], tokenizer, tmp_path / "out")
    tok = hf(tokenizer)
    for row, messages in zip(load(tmp_path / "out"), expected_messages("chat-messages-jsonl")):
        rendered = tok.apply_chat_template(messages, tokenize=False, date_string=chat.FIXED_DATE)
        assert tok.decode(row["input_ids"]) == rendered.rstrip()
        assert [tok.decode(run) for run in trained_runs(row)] == replies(messages, end)
    assert (f"Today Date: {chat.FIXED_DATE}\n" in tok.decode(row["input_ids"])) == (jinja == LLAMA31_STYLE)


def test_a_tokenizer_without_a_template_takes_a_built_in_one(sources, toks, tmp_path):
    src = sources["chat-messages-jsonl"]
    with pytest.raises(
        UserError, match=r"plain: the tokenizer has no chat template .*--template chatml\|llama3\|alpaca"
    ):
        prep(src, toks["plain"], tmp_path / "out")
    with pytest.raises(
        UserError, match=r"--template chatml writes <\|im_start\|>, <\|im_end\|>, which .*plain does not"
    ):
        prep(src, toks["plain"], tmp_path / "out", template="chatml")
    assert not (tmp_path / "out").exists()
    prep(src, toks["plain"], tmp_path / "bpe", template="alpaca")
    tok = hf(toks["plain"])
    for row, messages in zip(load(tmp_path / "bpe"), expected_messages("chat-messages-jsonl")):
        assert [tok.decode(run) for run in trained_runs(row)] == replies(messages, "alpaca")

    # SentencePiece: BOS first (the tokenizer starts sequences with it), each response ends with the EOS id.
    manifest = prep(src, toks["sp"], tmp_path / "sp", template="alpaca")
    sp = load_tokenizer(toks["sp"])
    assert manifest["template"]["variables"] == {"bos_token": "<s>", "eos_token": "</s>"}
    for row, messages in zip(load(tmp_path / "sp"), expected_messages("chat-messages-jsonl")):
        runs = trained_runs(row)
        assert row["input_ids"][0] == sp.bos_token_id and all(run[-1] == sp.eos_token_id for run in runs)
        assert [sp.decode(run[:-1]) for run in runs] == [m["content"] for m in messages if m["role"] == "assistant"]


# ---- length limits, packing, determinism ---------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer, template, keep", [("own", None, 0), ("sp", "alpaca", 1)])
def test_overlong_conversations_lose_their_left_context_never_the_last_turn(
    tokenizer, template, keep, sources, toks, tmp_path
):
    src = sources["chat-messages-jsonl"]
    prep(src, toks[tokenizer], tmp_path / "full", template=template)
    full = {r["id"]: r for r in load(tmp_path / "full")}
    limit = sorted(r["length"] for r in full.values())[len(full) // 2]
    manifest = prep(src, toks[tokenizer], tmp_path / "cut", template=template, max_len=limit)
    longer = [r for r in full.values() if r["length"] > limit]
    assert manifest["counts"]["truncated"] == len(longer) > 0 and manifest["counts"]["dropped"] == 0
    for row in load(tmp_path / "cut"):
        whole, n = full[row["id"]], row["length"]
        assert n <= limit
        assert row["input_ids"][:keep] == whole["input_ids"][:keep]  # the BOS stays
        assert row["input_ids"][keep:] == whole["input_ids"][len(whole["input_ids"]) - (n - keep) :]
        assert row["labels"][keep:] == whole["labels"][len(whole["labels"]) - (n - keep) :]
        assert trained_runs(row)[-1] == trained_runs(whole)[-1]  # the last assistant turn whole
    manifest = prep(src, toks[tokenizer], tmp_path / "drop", template=template, max_len=limit, drop_overlong=True)
    assert manifest["counts"]["dropped"] == len(longer) and len(load(tmp_path / "drop")) == len(full) - len(longer)

    # Where the last assistant turn leaves no room for context, the conversation is dropped, never cut into.
    short = sorted(len(trained_runs(r)[-1]) for r in full.values())[len(full) // 2] + keep
    manifest = prep(src, toks[tokenizer], tmp_path / "short", template=template, max_len=short)
    kept = [r for r in full.values() if r["length"] <= short or short - len(trained_runs(r)[-1]) >= max(keep, 1)]
    assert 0 < manifest["counts"]["kept"] == len(kept) < len(full) == len(kept) + manifest["counts"]["dropped"]


def test_packed_output_is_byte_identical_across_runs_process_counts_and_the_cli(sources, toks, tmp_path):
    src = sources["chat-sharegpt-jsonl"]
    prep(src, toks["own"], tmp_path / "plain")
    manifest = prep(src, toks["own"], tmp_path / "a", pack=512)
    prep(src, toks["own"], tmp_path / "b", pack=512)
    flags = ["--src", *src, "--tokenizer", toks["own"], "--out", tmp_path / "cli", "--pack", "512", "--num_proc", "2"]
    proc = run_cli("prep", "chat", *flags)
    assert proc.returncode == 0, proc.stderr
    assert "chat train (chat template: tokenizer): read 40, kept 40" in proc.stdout and "tokens/s" in proc.stdout
    assert dir_digest(tmp_path / "a") == dir_digest(tmp_path / "b") == dir_digest(tmp_path / "cli")

    plain = {r["id"]: r for r in load(tmp_path / "plain")}
    packed = load(tmp_path / "a")
    assert manifest["counts"]["rows"] == len(packed) < len(plain) / 2
    seen = []
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [row["length"]]
        for ex_id, a, b in zip(row["id"].split(","), starts, starts[1:]):
            assert row["input_ids"][a:b] == plain[ex_id]["input_ids"] and row["labels"][a:b] == plain[ex_id]["labels"]
            seen.append(ex_id)
    assert sorted(seen) == sorted(plain)


# ---- bad input -----------------------------------------------------------------------------------------------


def turns(*pairs, key="messages", role="role", content="content") -> dict:
    return {key: [{role: r, content: c} for r, c in pairs]}


GOOD = turns(("user", "Hi?"), ("assistant", "Hello."))
GOOD_SHAREGPT = turns(("human", "Hi?"), ("gpt", "Hello."), key="conversations", role="from", content="value")
BAD = [  # (case, the bad record (after a good one), the error)
    ("no messages", {"turns": GOOD["messages"]}, r"train.jsonl:2: field 'messages' is missing"),
    ("not a list", {"messages": "hi"}, r"train.jsonl:2: field 'messages' is 'hi', expected a list of turns"),
    ("turn not an object", {"messages": ["hi"]}, r"train.jsonl:2: field 'messages\[0\]' is 'hi', expected an object"),
    (
        "unknown role",
        turns(("user", "Hi?"), ("tool", "42")),
        r"train.jsonl:2: field 'messages\[1\].role' is 'tool', not one of system, user, assistant",
    ),
    (
        "roles out of order",
        turns(("user", "Hi?"), ("user", "Hello?"), ("assistant", "Yes.")),
        r"train.jsonl:2: field 'messages\[1\].role' is 'user' where 'assistant' is due",
    ),
    (
        "system not first",
        turns(("user", "Hi?"), ("assistant", "Yes."), ("system", "Be brief.")),
        r"train.jsonl:2: field 'messages\[2\].role' is 'system' where 'user' is due",
    ),
    (
        "empty content",
        turns(("user", "Hi?"), ("assistant", " \n")),
        r"train.jsonl:2: field 'messages\[1\].content' is empty",
    ),
    (
        "content not text",
        turns(("user", "Hi?"), ("assistant", ["Yes."])),
        r"train.jsonl:2: field 'messages\[1\].content' is \['Yes.'\], expected a string",
    ),
    (
        "no assistant turn",
        turns(("system", "Be brief."), ("user", "Hi?")),
        r"train.jsonl:2: field 'messages' has no 'assistant' turn",
    ),
    (
        "unanswered last turn",
        turns(("user", "Hi?"), ("assistant", "Yes."), ("user", "Sure?")),
        r"train.jsonl:2: field 'messages\[2\]' is a 'user' turn that no 'assistant' turn answers",
    ),
    (
        "mixed layouts",
        GOOD_SHAREGPT,
        r"train.jsonl:2: this record has the sharegpt layout, but the file began in the messages layout",
    ),
]
BAD_SHAREGPT = [  # the same, in a ShareGPT file
    ("no conversations", {"id": 3, "dialog": []}, r"train.jsonl:2: field 'conversations' is missing"),
    (
        "unknown sharegpt role",
        turns(("human", "Hi?"), ("bing", "42"), key="conversations", role="from", content="value"),
        r"train.jsonl:2: field 'conversations\[1\].from' is 'bing', not one of system, human, gpt",
    ),
    (
        "sharegpt out of order",
        turns(("gpt", "Hi."), ("human", "Hm?"), key="conversations", role="from", content="value"),
        r"train.jsonl:2: field 'conversations\[0\].from' is 'gpt' where 'human' is due",
    ),
]


@pytest.mark.parametrize(
    "first, record, message",
    [(GOOD, *c[1:]) for c in BAD] + [(GOOD_SHAREGPT, *c[1:]) for c in BAD_SHAREGPT],
    ids=[c[0] for c in BAD + BAD_SHAREGPT],
)
def test_bad_records_name_file_line_and_field_and_leave_nothing(first, record, message, toks, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message):
        prep([src], toks["own"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_skip_bad_skips_and_counts_bad_records_and_the_cli_names_the_first(toks, tmp_path):
    unknown_role, no_assistant = turns(("user", "Hi?"), ("tool", "42")), turns(("user", "Hi?"))
    lines = [json.dumps(GOOD), json.dumps(unknown_role), "{broken", json.dumps(GOOD), json.dumps(no_assistant)]
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = run_cli("prep", "chat", "--src", src, "--tokenizer", toks["own"], "--out", tmp_path / "out")
    assert proc.returncode == 2 and "train.jsonl:2: field 'messages[1].role' is 'tool'" in proc.stderr, proc.stderr
    assert "--skip_bad" in proc.stderr and not (tmp_path / "out").exists()
    manifest = prep([src], toks["own"], tmp_path / "out", skip_bad=True)
    assert manifest["counts"] == dict(read=5, filtered=0, skipped=3, dropped=0, truncated=0, kept=2, rows=2)
    assert [m.split(": ")[0] for m in manifest["skipped_records"]] == [f"{src}:{n}" for n in (2, 3, 5)]


def test_files_and_dirs_that_hold_no_chat_data_are_refused(sources, toks, tmp_path):
    from datasets import Dataset, DatasetDict

    split = Dataset.from_list([GOOD])
    DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "notes.txt").write_text("hi")
    for src, message in [
        (tmp_path / "dict", r"dict: holds the splits train, test; pass one split's dir"),
        (tmp_path / "empty", r"empty: a directory, but not one written by datasets' save_to_disk"),
        (tmp_path / "text.jsonl", r"text.jsonl:1: a record with fields text; expected records with messages"),
        (tmp_path / "notes.txt", r"notes.txt: not a chat data file"),
        (tmp_path / "none.jsonl", r"none.jsonl: no such file or directory"),
    ]:
        with pytest.raises(UserError, match=message):
            prep([src], toks["own"], tmp_path / "out")
    with pytest.raises(UserError, match=r"--src .*mixes formats .*is messages.*is alpaca"):
        prep(sources["chat-messages-jsonl"] + sources["chat-alpaca-json"], toks["own"], tmp_path / "out")
    with pytest.raises(UserError, match=r"a directory; pass the files it holds"):
        common.prepare(common.Settings("samsum", [str(tmp_path / "empty")], toks["own"], str(tmp_path / "out")))
    with pytest.raises(UserError, match=r"--template chatml: only `prep chat` takes a template"):
        common.Settings("samsum", [], toks["own"], str(tmp_path / "out"), template="chatml")
    assert not (tmp_path / "out").exists()


# ---- templates that cannot be used ---------------------------------------------------------------------------

REFUSES_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + CHATML_GENERATION
)
LAST_TURN_MARKED = (  # writes the last message differently from the same message followed by more
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% if loop.last %}{{ ' (last)' }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NO_END_OF_TURN = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_a_template_that_refuses_a_conversation_names_the_record_and_skip_bad_skips_it(sources, toks, tmp_path):
    tokenizer = with_template(toks, tmp_path, REFUSES_SYSTEM)
    src = sources["chat-sharegpt-jsonl"]
    with pytest.raises(UserError, match=r"train.jsonl:1: the chat template of .* refuses this conversation \(System"):
        prep(src, tokenizer, tmp_path / "out")
    manifest = prep(src, tokenizer, tmp_path / "out", skip_bad=True, num_proc=2)
    with_system = sum(m[0]["role"] == "system" for m in expected_messages("chat-sharegpt-jsonl"))
    assert manifest["counts"]["skipped"] == with_system > 0 and manifest["counts"]["kept"] == 40 - with_system
    assert all("System role not supported" in m for m in manifest["skipped_records"])


@pytest.mark.parametrize(
    "jinja, message",
    [
        (
            LAST_TURN_MARKED,
            r"train.jsonl:1: the chat template of .* renders messages\[:3\] as a text that does not begin with its "
            r"rendering of the turns before",
        ),
        (
            NO_END_OF_TURN,
            r"train.jsonl:1: the chat template .* ends the assistant turn messages\[2\] with .*, not with a special "
            r"token of the tokenizer",
        ),
        ("{% for m in messages %}{{ m['content'] }}", r"the chat template of .*: not a valid Jinja template"),
    ],
    ids=["breaks the prefix property", "no end-of-turn token", "not jinja"],
)
def test_a_template_whose_turns_cannot_be_told_apart_is_refused(jinja, message, sources, toks, tmp_path):
    with pytest.raises(UserError, match=message):
        prep(sources["chat-messages-jsonl"], with_template(toks, tmp_path, jinja), tmp_path / "out", skip_bad=True)
    assert not (tmp_path / "out").exists()
