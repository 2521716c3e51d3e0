"""Score a predictions file made anywhere against a task's data with the paper's metrics.

    lora-ds score --task wikisql --data wikisql/dev.jsonl --predictions preds.jsonl --out scores/wikisql
    lora-ds score --task mnli --data glue/MNLI/dev_matched.tsv glue/MNLI/dev_mismatched.tsv \\
        --predictions evals/mnli/predictions.jsonl --out scores/mnli
    lora-ds score --task samsum --data samsum/test.json --predictions other_system.jsonl --out scores/samsum

Predictions are JSON lines with "id" and "prediction" (the text after the prompt; `lora-ds eval` writes
such a file), matched to --data by id (add "split" when ids repeat across files; MNLI lines may add
"constrained", a label word chosen by likelihood). For WikiSQL the official evaluator's format is read
too: {"query": {"sel", "agg", "conds"}, "error": ""}, one line per line of the questions file, in order.
Writes the scored predictions.jsonl and metrics.json to --out and prints the metrics.
"""

from __future__ import annotations

from lora_ds.cli.eval import add_data_arguments


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--predictions", required=True, metavar="FILE", help="the predictions (JSON lines)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where predictions.jsonl and metrics.json go")


def run(args) -> int:
    from lora_ds.evaluation import format_table, load_eval_set, read_predictions, score, write_outputs

    evalset = load_eval_set(args.task, args.data, args.split)
    predictions, constrained = read_predictions(args.predictions, evalset)
    rows, by_split = score(evalset, predictions, constrained)
    write_outputs(
        args.out,
        evalset,
        rows,
        {"task": args.task, "metrics": by_split, "data": evalset.sources, "predictions": args.predictions},
    )
    print(f"{args.task}: {len(rows)} predictions from {args.predictions} -> {args.out}")
    print(format_table(args.task, by_split))
    return 0
