"""Tiny tokenizers trained on test text, so tests never need the Hugging Face hub.

    bpe_dir = train_bpe_tokenizer(texts, tmp_path / "bpe")               # HF tokenizer dir
    sp_file = train_sentencepiece_model(texts, tmp_path / "tokenizer.model")  # bare SentencePiece model

Both are deterministic for the same texts, and both keep text verbatim (newlines, `\\r`, quotes,
emoji): the BPE works on bytes, the SentencePiece model falls back to bytes and does not normalize.
"""
from __future__ import annotations

import io
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE (GPT-2 style) saved as a transformers tokenizer dir; BOS = EOS = `<|endoftext|>`.

    The dir holds tokenizer.json and tokenizer_config.json and loads with `AutoTokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def train_sentencepiece_model(texts: list[str], out_file: Path, vocab_size: int = 400) -> Path:
    """A Llama-style SentencePiece BPE `tokenizer.model`: unk=0, bos=1, eos=2, no pad, byte fallback.

    SentencePiece trains on lines, so texts are split at line breaks; byte fallback (which needs
    256 byte pieces, hence the larger vocab) still encodes the line breaks themselves.
    """
    import sentencepiece as spm

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.getvalue())
    return out_file
