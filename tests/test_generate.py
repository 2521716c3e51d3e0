"""lora-ds generate: the adapter's completions against PEFT's and the prompts against transformers' own chat
template rendering, seeded sampling, the interactive chat (stdin piped in, replies streamed), bad input, and
--prompts on 2 ZeRO-3 ranks against one process."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import flags, launch, run_cli

from lora_ds.cli import main as cli

MAX_NEW = 40
# A template of the usual shape (BOS, turns in role markers, the generation prompt opening the assistant turn);
# the demo tokenizer has none of its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYSTEM = "Answer in one line."
TEXTS = [
    "Who scored in 1997?",
    "What position does Alan Smith play, and for which club did he play in the season of 1997?",
    "Glenhollow",
    "Name a team.",
    "Which club?",
]
PROMPTS = [  # text becomes a user turn after --system; a conversation with a system turn keeps its own
    {"prompt": TEXTS[0]},
    {"messages": [{"role": "user", "content": TEXTS[3]}]},
    {"prompt": TEXTS[1]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": TEXTS[4]},
        ]
    },
    {"prompt": TEXTS[2]},
]


@pytest.fixture(scope="module")
def chat_dir(base_dir, tmp_path_factory) -> Path:
    """base_dir (the tiny GPT-NeoX whose generations end at different lengths) with CHAT_TEMPLATE in its
    tokenizer_config.json."""
    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(base_dir, out)
    config_file = out / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    return out


def write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(model_dir, out: Path, **values) -> list[dict]:
    """`lora-ds generate` in this process (fp32, batches of 2, MAX_NEW tokens unless `values` say otherwise) writing
    to `out`: its records."""
    common = dict(model=model_dir, out=out, dtype="fp32", micro_batch=2, max_new_tokens=MAX_NEW, no_progress=True)
    assert cli(["generate", *flags(**{**common, **values})]) == 0
    return read_out(out)


def reference_inputs(model_dir: Path, records: list[dict], system: str | None) -> list[list[int]]:
    """The input ids of each record by transformers alone: its tokenizer's chat template (with `system` before
    a conversation that has none), or its plain encoding of the text."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    if not hf.chat_template:
        return [hf(r["prompt"]).input_ids for r in records]
    inputs = []
    for r in records:
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        inputs.append(hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    return inputs


def peft_completions(model_dir: Path, adapter: Path, inputs: list[list[int]]) -> list[list[int]]:
    """PEFT's greedy completion ids (up to EOS) of each input, one at a time: the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    completions = []
    for ids in inputs:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=hf.eos_token_id,
                pad_token_id=hf.pad_token_id,
            )
        row = out[0, len(ids) :].tolist()
        completions.append(row[: row.index(hf.eos_token_id)] if hf.eos_token_id in row else row)
    return completions


@pytest.mark.parametrize("templated", [True, False], ids=["chat-template", "plain"])
def test_adapter_completions_equal_peft_token_for_token(templated, chat_dir, base_dir, random_adapter, tmp_path):
    """Base + adapter, prompts batched in twos (left-padded) with and without the chat template, against PEFT's
    generate of transformers' own rendering, one prompt at a time."""
    from lora_ds.eval_model import build_eval_model, read_lora
    from lora_ds.generate import generate_ids, stop_ids
    from lora_ds.prompts import encode_prompts, read_prompts
    from lora_ds.tokenizer import load_tokenizer

    model_dir = chat_dir if templated else base_dir
    if templated:
        records, file, system = PROMPTS, write_prompts(tmp_path / "prompts.jsonl", PROMPTS), SYSTEM
    else:
        records, system = [{"prompt": t} for t in TEXTS], None
        file = tmp_path / "prompts.txt"
        file.write_text("".join(f"{t}\n\n" for t in TEXTS))  # text lines; blank ones are skipped
    expected = peft_completions(model_dir, random_adapter, reference_inputs(model_dir, records, system))
    lengths = [len(ids) for ids in expected]
    assert min(lengths) < MAX_NEW == max(lengths), lengths  # some end at EOS, some run to the limit

    tok = load_tokenizer(str(model_dir))
    encoded = encode_prompts(tok, read_prompts(str(file)), system=system, use_template=True, max_len=1000)
    assert encoded == reference_inputs(model_dir, records, system)
    model, device, _ = build_eval_model(str(model_dir), tok, read_lora(str(random_adapter), None), "fp32", None)
    ours = generate_ids(
        model, tok, encoded, max_new_tokens=MAX_NEW, stop_ids=stop_ids(tok, str(model_dir)), batch_size=2, device=device
    )
    assert ours == expected

    out = generate(model_dir, tmp_path / "out.jsonl", adapter=random_adapter, prompts=file, system=system)
    assert out == [{**r, "completion": tok.decode(ids)} for r, ids in zip(records, expected)]


def test_a_completion_ends_at_an_end_of_turn_id_of_the_model_dirs_generation_config(chat_dir, tmp_path):
    """A generation_config.json written for the model (not derived from config.json) names end-of-turn ids, as
    Llama 3's names <|eot_id|>: the completion ends at the first of them."""
    from lora_ds.eval_model import build_eval_model
    from lora_ds.generate import generate_ids
    from lora_ds.prompts import Prompt, encode_prompts
    from lora_ds.tokenizer import load_tokenizer

    tok = load_tokenizer(str(chat_dir))
    model, device, _ = build_eval_model(str(chat_dir), tok, None, "fp32", None)
    [ids] = encode_prompts(tok, [Prompt("test", text=TEXTS[1])], system=None, use_template=True, max_len=1000)
    [full] = generate_ids(model, tok, [ids], max_new_tokens=MAX_NEW, device=device)
    cut = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    stops_dir = tmp_path / "model"
    shutil.copytree(chat_dir, stops_dir)
    (stops_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, full[cut]]}))
    [record] = generate(stops_dir, tmp_path / "out.jsonl", prompt=TEXTS[1])
    assert record == {"prompt": TEXTS[1], "completion": tok.decode(full[:cut])}


def test_seeded_sampling_repeats_its_draws_and_top_k_1_is_greedy(chat_dir, tmp_path):
    file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:3])

    def completions(name: str, **values) -> list[str]:
        out = tmp_path / f"{name}.jsonl"
        return [r["completion"] for r in generate(chat_dir, out, prompts=file, max_new_tokens=12, **values)]

    greedy = completions("greedy")
    first = completions("seed1", temperature=1.0, seed=1)
    assert completions("seed1-again", temperature=1.0, seed=1) == first
    assert completions("seed2", temperature=1.0, seed=2) != first != greedy
    assert completions("top-k-1", temperature=1.0, top_k=1, seed=2) == greedy


class Writes(io.StringIO):
    """A stdout that keeps each non-empty write."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, text: str) -> int:
        if text:
            self.chunks.append(text)
        return super().write(text)


def test_chat_streams_each_reply_as_it_is_generated_and_ends_at_exit(chat_dir, tmp_path, monkeypatch):
    [record] = generate(chat_dir, tmp_path / "out.jsonl", prompt=TEXTS[0])
    stdout = Writes()
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TEXTS[0]}\n/exit\n{TEXTS[1]}\n"))
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli(["generate", *flags(model=chat_dir, chat=True, dtype="fp32", max_new_tokens=MAX_NEW)]) == 0
    assert stdout.getvalue() == record["completion"] + "\n"  # one reply: /exit ended the chat
    assert len(stdout.chunks) >= 4, stdout.chunks  # words as they come, not the reply at its end


def test_chat_on_stdin_keeps_the_conversation_resets_and_ends_with_the_input(chat_dir, random_adapter, tmp_path):
    """`lora-ds generate --chat` with its input piped in: the second reply answers the conversation so far, /reset
    starts a new one, blank lines are skipped, the end of input ends the program; against --prompt / --prompts of
    the same conversations."""
    lines = f"{TEXTS[0]}\n{TEXTS[4]}\n\n/reset\n{TEXTS[0]}\n"
    chat = flags(model=chat_dir, adapter=random_adapter, system=SYSTEM, chat=True, dtype="fp32", max_new_tokens=MAX_NEW)
    proc = run_cli("generate", *chat, stdin=lines, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [first] = generate(chat_dir, tmp_path / "first.jsonl", adapter=random_adapter, system=SYSTEM, prompt=TEXTS[0])
    turns = [
        {"role": "user", "content": TEXTS[0]},
        {"role": "assistant", "content": first["completion"]},
        {"role": "user", "content": TEXTS[4]},
    ]
    file = write_prompts(tmp_path / "conversation.jsonl", [{"messages": turns}])
    [second] = generate(chat_dir, tmp_path / "second.jsonl", adapter=random_adapter, system=SYSTEM, prompts=file)
    assert proc.stdout == f"{first['completion']}\n{second['completion']}\n{first['completion']}\n"
    assert first["completion"] != second["completion"]


def test_bad_flags_and_prompts_are_refused_before_the_model_loads_naming_what_to_fix(
    chat_dir, base_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out.jsonl"

    def refused(model_dir, **values) -> str:
        assert cli(["generate", *flags(**{"model": model_dir, "out": out, **values})]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    one_process = "--chat runs in one process: start `lora-ds generate --chat` without deepspeed/torchrun"
    assert one_process in refused(chat_dir, chat=True, out=None, ds_config="ds_configs/zero3.json")
    with monkeypatch.context() as env:
        env.setenv("RANK", "0")
        env.setenv("WORLD_SIZE", "2")
        assert one_process in refused(chat_dir, chat=True, out=None)
    assert "--out takes the completions of --prompt or --prompts" in refused(chat_dir, chat=True)
    assert "give --temperature above 0 too" in refused(chat_dir, prompt="x", top_p=0.9)
    assert "--top_p 1.5: must be above 0 and at most 1" in refused(chat_dir, prompt="x", temperature=1, top_p=1.5)
    assert "leaves no room for the prompt in --max_len 64" in refused(
        chat_dir, prompt="x", max_len=64, max_new_tokens=64
    )

    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"text": "y"}])
    assert f'{bad}:2: expected "prompt" (text) or "messages" (a conversation)' in refused(chat_dir, prompts=bad)
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ends = write_prompts(tmp_path / "ends.jsonl", [{"messages": turns}])
    assert f"{ends}:1: the last turn is 'assistant'; end with a user turn" in refused(chat_dir, prompts=ends)
    roles = write_prompts(tmp_path / "roles.jsonl", [{"messages": [{"role": "human", "content": "x"}]}])
    assert f'{roles}:1: messages[0] must be {{"role": one of system, user, assistant' in refused(
        chat_dir, prompts=roles
    )

    conversation = write_prompts(tmp_path / "conversation.jsonl", [{"messages": turns[:1]}])
    none = f"the tokenizer {base_dir} has no chat_template"
    assert f"{conversation}:1: a conversation needs a chat template and {none}" in refused(
        base_dir, prompts=conversation
    )
    assert f"--system needs a chat template and {none}" in refused(base_dir, prompt="x", system="y")
    assert "--chat needs a chat template and --no_template is given" in refused(
        chat_dir, chat=True, out=None, no_template=True
    )


@pytest.mark.distributed
def test_prompts_on_two_zero3_ranks_equal_one_process(chat_dir, random_adapter, tmp_path):
    """PROMPTS with the adapter in batches of 2 on 2 ranks: rank 0 runs prompts [0, 1] and [4], rank 1 [2, 3] and a
    dummy batch; some completions end at EOS while others run to MAX_NEW (test_adapter_completions_equal_peft's
    check), so the ranks finish their batches at different steps."""
    file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    common = flags(
        model=chat_dir,
        adapter=random_adapter,
        prompts=file,
        system=SYSTEM,
        dtype="fp32",
        micro_batch=2,
        max_new_tokens=MAX_NEW,
        no_progress=True,
    )
    proc = launch(["generate", *common, "--out", tmp_path / "zero3.jsonl"], program="lora_ds", timeout=600)
    assert "5 completions on 2 rank(s) (ZeRO-3), greedy" in proc.stdout
    assert cli(["generate", *common, "--out", str(tmp_path / "one.jsonl")]) == 0
    zero3 = read_out(tmp_path / "zero3.jsonl")
    assert zero3 == read_out(tmp_path / "one.jsonl")
    assert [{k: v for k, v in r.items() if k != "completion"} for r in zero3] == PROMPTS


def test_a_builtin_template_renders_prompts_as_that_template_in_transformers(tmp_path):
    """--template chatml on a tokenizer with no template of its own: the ids transformers' apply_chat_template
    gives with the same Jinja as the tokenizer's template (the one `lora-ds prep chat --template chatml` trains on)."""
    from fixtures import save_chat_tokenizer
    from transformers import AutoTokenizer

    from lora_ds.prompts import Prompt, encode_prompts, require_template
    from lora_ds.tasks.chat import BUILTIN
    from lora_ds.tokenizer import load_tokenizer

    plain = load_tokenizer(str(save_chat_tokenizer(tmp_path / "plain", chat_template=None)))
    with pytest.raises(Exception, match="has no chat_template"):
        require_template(plain, True, "--chat")
    messages = [{"role": "user", "content": TEXTS[0]}]
    [ours] = encode_prompts(
        plain, [Prompt("t", messages=tuple(messages))], system="Be brief.", use_template=True, max_len=1000,
        template="chatml",
    )  # fmt: skip
    hf = AutoTokenizer.from_pretrained(save_chat_tokenizer(tmp_path / "own", chat_template=BUILTIN["chatml"].jinja))
    # bos_token "": the built-ins write BOS only for a tokenizer that starts sequences with it (this one does not).
    expected = hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages],
        add_generation_prompt=True,
        return_dict=True,
        bos_token="",
    )["input_ids"]
    assert ours == expected
