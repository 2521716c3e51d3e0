"""Merge a LoRA adapter into its base model: a plain Hugging Face model dir, no LoRA modules, no added latency.

    lora-ds merge --base /models/pythia-1.4b --adapter runs/demo/adapter --out merged/pythia-demo
    lora-ds merge --base /models/llama-7b --adapter runs/wikisql/adapter --out merged/llama-wikisql \
        --dtype bf16 --verify

W = W0 + s·B·A in fp32, cast once. The base's safetensors shards are rewritten one at a time (peak memory:
about the largest tensor plus the adapter); config, generation config and tokenizer files are copied.
--verify compares logits of base+adapter and of the merged model on a few prompts (both in fp32, one
model in memory at a time) and writes nothing if they differ beyond the tolerance.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        metavar="MODEL_DIR",
        help="Hugging Face model dir (model.safetensors, or shards + model.safetensors.index.json)",
    )
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="ADAPTER_DIR",
        help="PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors)",
    )
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="merged model dir (replaced if it exists)")
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="cast every floating tensor to this dtype (default: keep each tensor's dtype)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare base+adapter and merged logits on a few prompts before committing the output",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="--verify: largest allowed max |logit difference| / max(1, max |logit|) (default by "
        "stored dtype: 1e-4 fp32, 1e-2 fp16, 5e-2 bf16)",
    )


def run(args) -> int:
    import json

    from lora_ds.merge import merge_model_dir

    report = merge_model_dir(
        args.base, args.adapter, args.out, dtype=args.dtype, verify=args.verify, tolerance=args.tolerance
    )
    print(json.dumps(report, indent=2))
    return 0
