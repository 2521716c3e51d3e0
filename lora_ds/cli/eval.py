"""Evaluate a model, with its LoRA merged in, on WikiSQL, MNLI or SAMSum with the paper's metrics.

    lora-ds eval --model runs/merged --task wikisql --data wikisql/dev.jsonl --out evals/wikisql
    lora-ds eval --model /models/llama-7b --adapter runs/wikisql/adapter --task wikisql \\
        --data wikisql/dev.jsonl --out evals/wikisql --num_beams 4
    deepspeed --num_gpus 8 --no_local_rank --module lora_ds eval --model /models/llama-7b \\
        --checkpoint runs/mnli/checkpoints --task mnli \\
        --data glue/MNLI/dev_matched.tsv glue/MNLI/dev_mismatched.tsv --out evals/mnli   # ZeRO-3, 8 GPUs
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --no_local_rank --module lora_ds eval ...  # 2 CPU ranks
    torchrun --nproc_per_node 8 -m lora_ds eval ...                                      # the same, torchrun

In one process the model is loaded whole. Launched on several ranks (or given --ds_config) it is
partitioned by ZeRO-3 and all ranks generate in lockstep; both ways give the same predictions. The LoRA of
--adapter (a PEFT adapter dir) or --checkpoint (OUTPUT/checkpoints, or one tag in it) is merged into the
base weights first, with the modules it trained in full (modules_to_save) and the tokenizer it carries
(--add_tokens). --data takes the downloaded files (any format `lora-ds prep` reads); prompts are
rendered by the task's template, the text the model was trained on. Decoding is greedy unless --num_beams
is above 1; MNLI is also scored by the likeliest of the three label words. Writes predictions.jsonl and
metrics.json to --out and prints the metrics.
"""

from __future__ import annotations

import os

from lora_ds.config import DEMO_DIR, flag_spellings
from lora_ds.errors import UserError
from lora_ds.tasks import TASKS, get_task

ZERO3_CONFIG = os.path.join(os.path.dirname(os.path.dirname(DEMO_DIR)), "ds_configs", "zero3.json")


def add_data_arguments(parser) -> None:
    """--task, --data, --split: shared with `lora-ds score`."""
    parser.add_argument("--task", required=True, choices=TASKS, help="which task --data holds")
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="SRC",
        help="the task's downloaded file(s): WikiSQL dev.jsonl (dev.tables.jsonl beside it) or its "
        "HF export; MNLI dev_matched.tsv dev_mismatched.tsv, multinli_1.0_dev_*.jsonl or HF; "
        "SAMSum val.json, .csv or HF",
    )
    parser.add_argument(
        "--split",
        nargs="+",
        default=None,
        metavar="S",
        help="a split name per --data file (default: from the file name; MNLI: matched or mismatched)",
    )


def add_model_arguments(parser) -> None:
    """--model, --tokenizer, --adapter / --checkpoint, --dtype, --ds_config: shared with `lora-ds generate`."""
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face model dir (base, or already merged) or preset:NAME (random weights, drawn "
        "as the training run drew them: evaluate on the launch it trained on)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir or tokenizer.model (default: the one --adapter or --checkpoint carries, from "
        "--add_tokens; else the model dir; the demo's for presets)",
    )
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter dir to merge in")
    lora.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a training checkpoint to take the LoRA from: OUTPUT/checkpoints (its latest) or a tag",
    )
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype")
    parser.add_argument(
        *flag_spellings("--ds_config"),
        default=None,
        help=f"DeepSpeed config; default when launched on several ranks: {ZERO3_CONFIG}",
    )


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="where predictions.jsonl and metrics.json go")
    parser.add_argument(
        *flag_spellings("--max_new_tokens"),
        type=int,
        default=None,
        metavar="N",
        help="generation length (default: wikisql 128, mnli 8, samsum 128)",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N examples per file")
    parser.add_argument(
        *flag_spellings("--num_beams"), type=int, default=1, metavar="K", help="beam width; 1 is greedy (default)"
    )
    add_batch_arguments(parser, max_len=1024)


def add_batch_arguments(parser, max_len: int) -> None:
    """--micro_batch, --max_len, --no_progress: shared with `lora-ds generate`."""
    # train's --micro_batch: sequences per rank per forward, and the DeepSpeed micro-batch under ZeRO-3.
    parser.add_argument(
        *flag_spellings("--micro_batch"),
        "--batch-size",
        dest="batch_size",
        type=int,
        default=8,
        metavar="B",
        help="prompts per forward pass per rank (default: 8)",
    )
    parser.add_argument(
        *flag_spellings("--max_len"),
        type=int,
        default=max_len,
        metavar="N",
        help=f"prompt + generated tokens; longer prompts lose tokens from the left (default: {max_len})",
    )
    parser.add_argument(*flag_spellings("--no_progress"), action="store_true", help="no progress bar")


def check_at_least(*limits) -> None:
    """Refuse a flag below its least value: (flag, value or None, least) each."""
    for flag, value, least in limits:
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")


def _check(args) -> None:
    check_at_least(
        ("--limit", args.limit, 1),
        ("--num_beams", args.num_beams, 1),
        ("--micro_batch", args.batch_size, 1),
        ("--max_new_tokens", args.max_new_tokens, 1),
        ("--max_len", args.max_len, 2),
    )
    if args.max_new_tokens is not None and args.max_new_tokens >= args.max_len:
        raise UserError(
            f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in --max_len "
            f"{args.max_len}; raise --max_len"
        )


def model_tokenizer(args, lora=None):
    """The tokenizer of --tokenizer, else the one `lora` carries (--add_tokens extended it), else of the --model
    dir (the demo's for a preset)."""
    from lora_ds.eval_model import lora_tokenizer_dir
    from lora_ds.tokenizer import load_tokenizer

    is_preset = args.model.startswith("preset:")
    default = os.path.join(DEMO_DIR, "tokenizer") if is_preset else args.model
    return load_tokenizer(args.tokenizer or lora_tokenizer_dir(lora) or default)


def ranks(args) -> tuple[int, int, dict | None]:
    """(rank, world, ZeRO-3 config or None): one process, or every rank of a launcher (or --ds_config); the
    DeepSpeed micro-batch is --micro_batch."""
    from lora_ds.config import ModelConfig, RunConfig, TrainConfig, resolve_ds_config
    from lora_ds.dist import discover, init_distributed

    if discover().world_size == 1 and not args.ds_config:
        return 0, 1, None
    env = init_distributed()
    cfg = RunConfig(
        model=ModelConfig(name=args.model, dtype=args.dtype),
        train=TrainConfig(ds_config=args.ds_config or ZERO3_CONFIG, micro_batch=args.batch_size),
    )
    return env.rank, env.world_size, resolve_ds_config(cfg, env.world_size)


def _report(args, evalset, by_split, lora, max_new_tokens: int, world: int, zero3: bool, constrained, seconds):
    """metrics.json's record of one evaluation."""
    report = {
        "task": args.task,
        "metrics": by_split,
        "data": evalset.sources,
        "model": args.model,
        "lora": lora.source if lora else None,
        "dtype": args.dtype,
        "decoding": {
            "strategy": "beam" if args.num_beams > 1 else "greedy",
            "num_beams": args.num_beams,
            "max_new_tokens": max_new_tokens,
            "max_len": args.max_len,
        },
        "world_size": world,
        "zero3": zero3,
        "limit": args.limit,
        "wall_time_s": seconds,
    }
    if constrained is not None:
        report["constrained"] = "argmax of log p(label word EOS | prompt) over the three label words"
    return report


def run(args) -> int:
    import time

    from lora_ds.dist import shutdown
    from lora_ds.eval_model import build_eval_model, read_lora
    from lora_ds.evaluation import format_table, load_eval_set, predict, score, write_outputs

    start = time.perf_counter()
    _check(args)
    max_new_tokens = args.max_new_tokens or get_task(args.task).MAX_NEW_TOKENS
    evalset = load_eval_set(args.task, args.data, args.split, args.limit)
    lora = read_lora(args.adapter, args.checkpoint)
    tok = model_tokenizer(args, lora)
    rank, world, ds_config = ranks(args)
    model, device, keepalive = build_eval_model(args.model, tok, lora, args.dtype, ds_config)
    generated, constrained = predict(
        model,
        tok,
        evalset,
        max_new_tokens=max_new_tokens,
        num_beams=args.num_beams,
        batch_size=args.batch_size,
        max_len=args.max_len,
        device=device,
        rank=rank,
        world=world,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    if rank == 0:
        rows, by_split = score(evalset, generated, constrained)
        report = _report(
            args, evalset, by_split, lora, max_new_tokens, world, ds_config is not None, constrained, seconds
        )
        write_outputs(args.out, evalset, rows, report)
        print(
            f"{args.task}: {len(rows)} examples on {world} rank(s){' (ZeRO-3)' if ds_config else ''}, "
            f"{report['decoding']['strategy']} decoding, {seconds:.1f} s -> {args.out}"
        )
        print(format_table(args.task, by_split))
    del keepalive
    shutdown()
    return 0
