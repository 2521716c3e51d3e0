"""Ratios of ours against each anchor from one interleaved run's JSON lines (bench/run_gpu.sh), appended to the
file as `{"kind": "ratio", ...}` lines and printed.

    python bench/compare.py bench/results/FILE.jsonl

A stack's figure is the median over rounds of its runs' tok/s (each run's: tokens per step / its median step,
or with --lengths the median of its steps' useful tokens / time); the best single step of all rounds is beside
it. speedup = ours tok/s / anchor tok/s; memory_ratio = ours peak allocated / anchor peak allocated (the
largest over rounds, each). A variant of ours (`ours:--quantize nf4`) is also compared with plain `ours` when
that ran: its line has "anchor": "ours".
"""

import json
import statistics
import sys


def summary(runs: list[dict]) -> dict:
    tok_s = statistics.median(r["tok_s_per_gpu"] for r in runs)
    mfu = [r["mfu_vs_790"] for r in runs if r.get("mfu_vs_790") is not None]
    return {
        "tok_s_per_gpu": tok_s,
        "best_tok_s_per_gpu": max(r["best_tok_s_per_gpu"] for r in runs),
        "rounds_tok_s": [round(r["tok_s_per_gpu"]) for r in runs],
        "mfu_vs_790": statistics.median(mfu) if mfu else None,
        "peak_alloc_gib": max(r["peak_alloc_gib"] for r in runs),
        "rounds": len(runs),
    }


def ratios(runs: list[dict]) -> list[dict]:
    by_tag = {}
    for r in runs:
        by_tag.setdefault(r["tag"], []).append(r)
    stats = {tag: summary(rs) for tag, rs in by_tag.items()}
    lines = []
    for tag, ours in stats.items():
        if not tag.startswith("ours"):
            continue
        baselines = [t for t in stats if t.startswith("anchor") or (t == "ours" != tag)]
        for anchor in baselines:
            first = by_tag[tag][0]
            lines.append(
                {
                    "kind": "ratio",
                    "model": first["model"],
                    "gpus": first["gpus"],
                    "micro_batch": first["micro_batch"],
                    "seq": first["seq"],
                    "targets": first["targets"],
                    "lora_r": first["lora_r"],
                    "ours": tag,
                    "anchor": anchor,
                    "speedup": ours["tok_s_per_gpu"] / stats[anchor]["tok_s_per_gpu"],
                    "best_step_speedup": ours["best_tok_s_per_gpu"] / stats[anchor]["best_tok_s_per_gpu"],
                    "ours_mfu_vs_790": ours["mfu_vs_790"],
                    "anchor_mfu_vs_790": stats[anchor]["mfu_vs_790"],
                    "memory_ratio": ours["peak_alloc_gib"] / stats[anchor]["peak_alloc_gib"],
                    "rounds": min(ours["rounds"], stats[anchor]["rounds"]),
                    "lengths": first.get("lengths"),
                    "ours_stats": ours,
                    "anchor_stats": stats[anchor],
                    "date": first["date"],
                }
            )
    return lines


def main(path: str) -> None:
    runs = [json.loads(line) for line in open(path) if line.strip()]
    lines = ratios([r for r in runs if r.get("kind", "run") == "run"])
    with open(path, "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
            print("RATIO " + json.dumps({k: v for k, v in line.items() if not k.endswith("_stats")}))


if __name__ == "__main__":
    main(sys.argv[1])
