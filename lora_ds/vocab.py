"""--add_tokens: new tokens in the tokenizer, and the input embedding and output head grown for them under ZeRO-3.

    tokenizer  = extend_tokenizer(dir, "tokens.txt")      # one token a line; or "template:chatml" (its specials)
    grow_vocab(model, tokenizer.vocab_size, first_new_id)  # collective under ZeRO-3: every rank calls it

The rows of the new ids start at the mean of the rows of the ids the base's tokenizer had, in both matrices (the
`mean_resizing` of transformers draws them around that mean at random instead; the mean itself keeps every rank and
the single-process reference on the same values and is what the LLaMA-Factory/TRL recipes use). The matrices grow
only when the ids do not fit their rows (a base with spare rows keeps its shape), through transformers'
`resize_token_embeddings`, which builds the grown matrices inside `zero.Init` and copies the old rows through
gathered parameters. A grown vocabulary is trained in full (`lora_ds.saved_modules`) and its tokenizer is saved
with every checkpoint and adapter (`tokenizer_files`), as PEFT users save theirs.
"""

from __future__ import annotations

import os
import tempfile

import torch

from lora_ds.errors import UserError
from lora_ds.tokenizer import HF_TOKENIZER_FILES, Tokenizer, _from_hf
from lora_ds.zero import full_shape, gathered

TEMPLATE = "template:"
# What a Hugging Face tokenizer's save_pretrained writes, told by name: copied with checkpoints and adapters.
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges")


def read_tokens(spec: str) -> tuple[list[str], bool]:
    """(tokens, special) of `--add_tokens`: a file's lines (plain added tokens), or template:NAME's tokens
    (special tokens: a chat template's turn markers)."""
    from lora_ds.tasks.chat import BUILTIN

    if spec.startswith(TEMPLATE):
        name = spec[len(TEMPLATE) :]
        if name not in BUILTIN or not BUILTIN[name].tokens:
            with_tokens = [n for n, b in BUILTIN.items() if b.tokens]
            raise UserError(f"--add_tokens {spec}: choose template:{'|template:'.join(with_tokens)} or a file")
        return list(BUILTIN[name].tokens), True
    if not os.path.isfile(spec):
        raise UserError(f"--add_tokens {spec}: no such file (one token a line, or template:NAME)")
    with open(spec, encoding="utf-8") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    tokens = [t for t in tokens if t.strip()]
    if not tokens:
        raise UserError(f"--add_tokens {spec}: holds no tokens (one token a line)")
    if len(set(tokens)) != len(tokens):
        twice = next(t for t in tokens if tokens.count(t) > 1)
        raise UserError(f"--add_tokens {spec}: {twice!r} is listed twice")
    return tokens, False


def extend_tokenizer(directory: str, spec: str) -> tuple[Tokenizer, dict[str, str], int]:
    """(the tokenizer of `directory` with `spec`'s tokens added, its files {name: text} as save_pretrained writes
    them, the first new id). Tokens it already has keep their ids."""
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(directory, f)) for f in HF_TOKENIZER_FILES):
        raise UserError(
            f"--add_tokens: {directory} has no Hugging Face tokenizer ({' or '.join(HF_TOKENIZER_FILES)}); "
            "tokens can be added only to one"
        )
    tokens, special = read_tokens(spec)
    hf = AutoTokenizer.from_pretrained(directory)
    first_new = len(hf)
    hf.add_tokens(tokens, special_tokens=special)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        files = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), encoding="utf-8") as f:
                files[name] = f.read()
        tok = _from_hf(tmp)
    tok.source = f"{directory} + --add_tokens {spec}"
    return tok, files, first_new


def tokenizer_files(directory: str) -> dict[str, str]:
    """{name: text} of the tokenizer files saved in `directory` (a checkpoint tag or adapter dir); {} for none."""
    files = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(TOKENIZER_PREFIXES) and os.path.isfile(os.path.join(directory, name)):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                files[name] = f.read()
    return files


def vocab_matrices(model) -> list:
    """The matrices with a row per token id: the input embedding's weight, and the output head's when untied."""
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    return matrices


def ensure_rows(model, rows: int) -> bool:
    """Grow `model`'s input embedding and output head to `rows` when they have fewer (transformers' resize,
    inside zero.Init under ZeRO-3; the new rows' values are the caller's to set). Returns whether they grew."""
    if rows <= full_shape(model.get_input_embeddings().weight)[0]:
        return False
    model.resize_token_embeddings(rows, mean_resizing=False)
    return True


def grow_vocab(model, vocab_size: int, first_new: int) -> int:
    """Give `model` rows for ids up to `vocab_size` and set the rows of ids `first_new`.. to the mean of the rows
    before them, in the input embedding and an untied output head. Returns the number of rows. Collective under
    ZeRO-3."""
    ensure_rows(model, vocab_size)
    rows = full_shape(model.get_input_embeddings().weight)[0]
    for weight in vocab_matrices(model):
        with gathered([weight], modifier_rank=0), torch.no_grad():
            weight[first_new:vocab_size] = weight[:first_new].float().mean(dim=0).to(weight.dtype)
    return rows
