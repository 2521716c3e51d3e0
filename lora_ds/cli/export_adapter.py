"""Export a PEFT adapter from a ZeRO-3 checkpoint, on a CPU, without the base model or a process group.

    lora-ds export-adapter --checkpoint runs/demo/checkpoints --out runs/demo/adapter-latest
    lora-ds export-adapter --checkpoint runs/wikisql/checkpoints --tag step_00001000 --out adapters/wikisql-1k \
        --dtype bf16

Reads the fp32 master partitions of the LoRA factors from every rank's optimizer file (mmap: frozen
fragments and Adam moments are never read), checks world size, shapes and that every adapted module is
there, and writes adapter_config.json + adapter_model.safetensors for `peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="OUTPUT/checkpoints of a run (or one tag dir inside it)"
    )
    parser.add_argument("--tag", default=None, help="which checkpoint tag (default: the one 'latest' names)")
    parser.add_argument("--out", required=True, metavar="DIR", help="adapter dir to write (replaced if it exists)")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="dtype of the saved factors (default fp32, the optimizer's master copies)",
    )


def run(args) -> int:
    import json

    from lora_ds.consolidate import export_adapter

    report = export_adapter(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype)
    print(json.dumps(report, indent=2))
    return 0
