"""Tokenizers from a Hugging Face tokenizer directory or a bare SentencePiece `tokenizer.model`.

Everything downstream uses the small `Tokenizer` interface below. A directory that holds only a
SentencePiece model (as many Llama repos ship) is read with sentencepiece itself: transformers 5's
conversion of such a directory without a tokenizer config does not reproduce SentencePiece's ids.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from lora_ds.errors import UserError
from lora_ds.fsutil import sha256_file

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Tokenizer:
    """Text <-> ids with the special ids training and generation need."""

    encode_fn: object
    decode_fn: object
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int
    vocab_size: int
    add_bos: bool
    source: str
    identity: str
    # What chat templates need: the tokens written out in text that stand for one id, the strings templates call
    # bos_token, eos_token..., the tokenizer's own template (Jinja, or a dict of named ones) if it has one.
    special_tokens: dict[str, int] = field(default_factory=dict)
    special_tokens_map: dict[str, str] = field(default_factory=dict)
    chat_template: str | dict | None = None
    encode_special_fn: object = None

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added."""
        return self.encode_fn(text)

    def encode_special(self, text: str) -> list[int]:
        """Ids of `text` as a chat template writes it: each of `special_tokens` written out in it is its id."""
        return (self.encode_special_fn or self.encode_fn)(text)

    def with_bos(self, ids: list[int], max_len: int | None = None) -> list[int]:
        """[BOS] ids when this tokenizer starts a sequence with BOS: how every context (training, generation,
        merge verification) begins. Cut to `max_len` by dropping ids from the left; the BOS stays."""
        bos = [self.bos_token_id] if self.add_bos else []
        if max_len is not None and len(ids) > max_len - len(bos):
            ids = ids[len(ids) - (max_len - len(bos)) :]
        return bos + ids

    def decode(self, ids) -> str:
        """Text of `ids` (or of one id: transformers' streamers decode single ids too)."""
        return self.decode_fn([int(ids)] if isinstance(ids, int) else [int(i) for i in ids])


def _from_sentencepiece(model_file: str) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    eos = sp.eos_id()
    if eos < 0:
        raise UserError(f"{model_file}: the SentencePiece model defines no EOS piece; retrain it with eos_id set")
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    pad = sp.pad_id() if sp.pad_id() >= 0 else eos
    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    names = {"bos_token": bos, "eos_token": eos, "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    return Tokenizer(
        encode_fn=lambda text: sp.encode(text),
        decode_fn=lambda ids: sp.decode(ids),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        vocab_size=sp.get_piece_size(),
        add_bos=bos is not None,
        source=model_file,
        identity=f"sentencepiece:{sha256_file(model_file)}",
        special_tokens=specials,
        special_tokens_map={name: sp.id_to_piece(i) for name, i in names.items() if i is not None and i >= 0},
        encode_special_fn=_split_at(specials, sp.encode),
    )


def _split_at(specials: dict[str, int], encode):
    """`encode`, with each of `specials` written out in the text taken as its id (SentencePiece's own encoding
    reads control pieces such as `</s>` as plain text)."""
    if not specials:
        return encode
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

    def encode_special(text: str) -> list[int]:
        ids, start = [], 0
        for match in pattern.finditer(text):
            ids += encode(text[start : match.start()]) if match.start() > start else []
            ids.append(specials[match.group()])
            start = match.end()
        return ids + (encode(text[start:]) if start < len(text) else [])

    return encode_special


def _from_hf(directory: str) -> Tokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.eos_token_id is None:
        raise UserError(f"{directory}: the tokenizer defines no eos_token; set it in tokenizer_config.json")
    probe = tok("a", add_special_tokens=True).input_ids
    add_bos = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id
    files = sorted(f for f in os.listdir(directory) if f.startswith(("tokenizer", "special_tokens")))
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        digest.update(sha256_file(os.path.join(directory, name)).encode())
    return Tokenizer(
        encode_fn=lambda text: tok(text, add_special_tokens=False).input_ids,
        decode_fn=lambda ids: tok.decode(ids, skip_special_tokens=True),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        vocab_size=len(tok),
        add_bos=add_bos,
        source=directory,
        identity=f"hf:{digest.hexdigest()}",
        # transformers reads every added token written out in text as its id
        special_tokens={t.content: i for i, t in tok.added_tokens_decoder.items()},
        special_tokens_map={k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)},
        chat_template=tok.chat_template,
    )


def load_tokenizer(path: str) -> Tokenizer:
    """Load from a HF tokenizer dir, a dir holding only `tokenizer.model`, or a `.model` file."""
    if os.path.isfile(path):
        if path.endswith(".model"):
            return _from_sentencepiece(path)
        raise UserError(f"--tokenizer {path}: expected a directory or a SentencePiece .model file")
    if not os.path.isdir(path):
        raise UserError(f"--tokenizer {path}: no such file or directory")
    if any(os.path.exists(os.path.join(path, f)) for f in HF_TOKENIZER_FILES):
        return _from_hf(path)
    sp_file = os.path.join(path, "tokenizer.model")
    if os.path.exists(sp_file):
        return _from_sentencepiece(sp_file)
    raise UserError(
        f"{path}: no tokenizer found (expected tokenizer.json, tokenizer_config.json or tokenizer.model); "
        "copy the tokenizer files of the model into this directory"
    )


def tokenizer_record(tok: Tokenizer) -> dict:
    """What identifies a tokenizer in manifests and run configs."""
    return {
        "source": tok.source,
        "identity": tok.identity,
        "vocab_size": tok.vocab_size,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "add_bos": tok.add_bos,
    }
