"""Generate with a model, its LoRA merged in: one prompt, a file of prompts, or an interactive chat.

    lora-ds generate --model /models/llama-3-8b --adapter runs/chat/adapter --prompt "Name three primes."
    lora-ds generate --model runs/merged --prompts prompts.jsonl --out completions.jsonl --temperature 0.7 --seed 1
    lora-ds generate --model /models/llama-3-8b --adapter runs/chat/adapter --chat --system "Answer briefly."
    deepspeed --num_gpus 8 --no_local_rank --module lora_ds generate --model /models/llama-70b \\
        --adapter runs/x/adapter --prompts prompts.jsonl --out completions.jsonl    # ZeRO-3, 8 GPUs in lockstep

Prompts are rendered by the tokenizer's chat template (its `chat_template`, with the generation prompt) when it
has one, or by the built-in --template NAME, as `lora-ds prep chat` renders training data: a text prompt becomes
a user turn, after --system. With --no_template, or a tokenizer without a template,
a text prompt is encoded as training encodes prompt/completion data. --prompts reads JSON lines with "prompt" (text)
or "messages" ([{"role", "content"}] ending with a user turn), or plain text, one prompt a line; the prompts as
given, each with its "completion", go to --out as JSON lines (to stdout without --out). Decoding is greedy unless
--temperature is above 0 (then --top_p and --top_k apply, seeded by --seed: the same draws on any number of ranks).
A completion ends at the tokenizer's EOS or at an end-of-turn id of the model dir's generation_config.json.
Launched on several ranks the model is partitioned by ZeRO-3 and all ranks generate in lockstep, which gives what
one process gives. --chat (one process only) reads a line at a time from stdin, streams the reply as it is
generated and keeps the conversation; /reset starts a new one, /exit or the end of input ends it.
"""

from __future__ import annotations

import sys

from lora_ds.cli.eval import add_batch_arguments, add_model_arguments, check_at_least
from lora_ds.config import flag_spellings
from lora_ds.tasks.chat import BUILTIN


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt; its completion is printed")
    source.add_argument("--prompts", metavar="FILE", help="JSON lines of prompt or messages, or text lines")
    source.add_argument("--chat", action="store_true", help="talk to the model on stdin (one process)")
    parser.add_argument("--system", metavar="TEXT", help="a system turn before each conversation that has none")
    parser.add_argument(
        *flag_spellings("--no_template"), action="store_true", help="plain prompts, not the chat template"
    )
    parser.add_argument(
        "--template",
        choices=BUILTIN,
        help="a built-in chat template (as `lora-ds prep chat --template`); default: the tokenizer's own",
    )
    parser.add_argument("--out", metavar="FILE", help="write the JSON lines of prompt and completion here")
    parser.add_argument(
        *flag_spellings("--max_new_tokens"), type=int, default=256, metavar="N", help="tokens to generate at most"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 is greedy (default)"
    )
    parser.add_argument(
        *flag_spellings("--top_p"), type=float, default=1.0, metavar="P", help="nucleus sampling (default: 1, off)"
    )
    parser.add_argument(
        *flag_spellings("--top_k"), type=int, default=0, metavar="K", help="sample from the K likeliest (0: off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default: 0)")
    add_batch_arguments(parser, max_len=4096)


def _check(args) -> None:
    from lora_ds.dist import discover
    from lora_ds.errors import UserError

    check_at_least(
        ("--max_new_tokens", args.max_new_tokens, 1),
        ("--max_len", args.max_len, 2),
        ("--micro_batch", args.batch_size, 1),
        ("--temperature", args.temperature, 0),
        ("--top_k", args.top_k, 0),
    )
    if args.max_new_tokens >= args.max_len:
        raise UserError(
            f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in --max_len {args.max_len}"
        )
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p}: must be above 0 and at most 1")
    if args.temperature == 0 and (args.top_p != 1 or args.top_k != 0):
        raise UserError("--top_p and --top_k shape sampling, and decoding is greedy: give --temperature above 0 too")
    if args.chat and args.out:
        raise UserError("--out takes the completions of --prompt or --prompts; --chat prints its replies")
    if args.chat and (discover().world_size > 1 or args.ds_config):
        raise UserError(
            "--chat runs in one process: start `lora-ds generate --chat` without deepspeed/torchrun and without "
            "--ds_config (use --prompts to generate on several ranks)"
        )


def _sampling(args, turn: int = 0):
    from lora_ds.generate import Sampling

    if args.temperature == 0:
        return None
    return Sampling(args.temperature, args.top_p, args.top_k, args.seed + turn)


def _decoding(args, tok) -> dict:
    """generate_ids' decoding arguments from the flags."""
    from lora_ds.generate import stop_ids

    model_dir = None if args.model.startswith("preset:") else args.model
    return dict(max_new_tokens=args.max_new_tokens, stop_ids=stop_ids(tok, model_dir), sampling=_sampling(args))


def _read_prompts(args, tok):
    """(the prompts of --prompt or --prompts, their ids): read before the model is, so that bad input fails fast."""
    from lora_ds.prompts import Prompt, encode_prompts, read_prompts

    prompts = [Prompt("--prompt", text=args.prompt)] if args.prompts is None else read_prompts(args.prompts)
    limit = args.max_len - args.max_new_tokens
    return prompts, encode_prompts(
        tok, prompts, system=args.system, use_template=not args.no_template, max_len=limit, template=args.template
    )


def _write(args, tok, prompts, completions, how: str) -> None:
    """The completion of --prompt on stdout, or the JSON lines of each prompt and its completion to --out (else
    stdout); `how` says how they were made."""
    import json

    from lora_ds.fsutil import write_text

    records = [{**p.record(), "completion": tok.decode(ids)} for p, ids in zip(prompts, completions)]
    if args.prompts is None and not args.out:
        print(records[0]["completion"])
        return
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not args.out:
        sys.stdout.write(lines)
        return
    write_text(args.out, lines)
    print(f"{len(records)} completions {how} -> {args.out}")


def _chat(args, model, tok, device) -> None:
    """The conversation on stdin/stdout: each reply streams as it is generated, then joins the history."""
    from transformers import TextStreamer

    from lora_ds.generate import generate_ids
    from lora_ds.prompts import Prompt, encode_prompts

    use_template = not args.no_template
    decoding = _decoding(args, tok)
    interactive = sys.stdin.isatty()
    if interactive:
        print("/reset starts a new conversation, /exit or Ctrl-D ends", file=sys.stderr)
    history, turn = [], 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\r\n")})
        [ids] = encode_prompts(
            tok,
            [Prompt("--chat", messages=tuple(history))],
            system=args.system,
            use_template=use_template,
            max_len=args.max_len - args.max_new_tokens,
            template=args.template,
        )
        [reply] = generate_ids(
            model,
            tok,
            [ids],
            **{**decoding, "sampling": _sampling(args, turn)},
            batch_size=1,
            device=device,
            progress=False,
            streamer=TextStreamer(tok, skip_prompt=True),
        )
        history.append({"role": "assistant", "content": tok.decode(reply)})
        turn += 1


def run(args) -> int:
    import time

    from lora_ds.cli.eval import model_tokenizer, ranks
    from lora_ds.dist import shutdown
    from lora_ds.eval_model import build_eval_model, read_lora
    from lora_ds.generate import generate_ids
    from lora_ds.prompts import require_template

    start = time.perf_counter()
    _check(args)
    lora = read_lora(args.adapter, args.checkpoint)
    tok = model_tokenizer(args, lora)
    if args.chat:
        require_template(tok, not args.no_template, "--chat", args.template)
    else:
        prompts, encoded = _read_prompts(args, tok)
    rank, world, ds_config = ranks(args)
    model, device, keepalive = build_eval_model(args.model, tok, lora, args.dtype, ds_config)
    if args.chat:
        _chat(args, model, tok, device)
    else:
        completions = generate_ids(
            model,
            tok,
            encoded,
            **_decoding(args, tok),
            batch_size=args.batch_size,
            device=device,
            rank=rank,
            world=world,
            progress=not args.no_progress and args.prompts is not None,
        )
        if rank == 0:
            zero3 = " (ZeRO-3)" if ds_config else ""
            how = f"{'sampled' if args.temperature else 'greedy'}, {time.perf_counter() - start:.1f} s"
            _write(args, tok, prompts, completions, f"on {world} rank(s){zero3}, {how}")
    del keepalive
    shutdown()
    return 0
