"""Plot a run's training curves (loss, gradient norm, lr, tokens/s, peak memory) from its metrics.jsonl.

    lora-ds plot runs/demo                      # figures in runs/demo/plots/
    lora-ds plot runs/wikisql --out figs/wikisql

Writes loss.png (eval_loss as points where it was logged), grad_norm.png, lr.png, tokens_per_s.png and
peak_mem.png (a curve that no record holds is left out); for a resumed run the later record of a repeated step
is used.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")


def run(args) -> int:
    import os

    from lora_ds.plots import metrics_figures, read_metrics

    records = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    out = args.out or os.path.join(args.run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    for name in metrics_figures(records, out):
        print(os.path.join(out, name))
    return 0
