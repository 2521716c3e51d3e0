"""Ratios of ours against the anchor from one run's JSON lines (bench/throughput.py output).

    python bench/compare.py bench/results/FILE.jsonl
"""
import json
import sys


def main(path: str) -> None:
    runs = [json.loads(line) for line in open(path) if line.strip()]
    anchors = [r for r in runs if r["stack"] == "anchor"]
    for ours in (r for r in runs if r["stack"] == "ours"):
        for anchor in anchors:
            if (anchor["model"], anchor["gpus"], anchor["seq"]) != (ours["model"], ours["gpus"], ours["seq"]):
                continue
            summary = {
                "model": ours["model"], "gpus": ours["gpus"], "micro_batch": (ours["micro_batch"],
                                                                              anchor["micro_batch"]),
                "tok_s_per_gpu": (round(ours["tok_s_per_gpu"]), round(anchor["tok_s_per_gpu"])),
                "speedup": ours["tok_s_per_gpu"] / anchor["tok_s_per_gpu"],
                "peak_alloc_gib": (round(ours["peak_alloc_gib"], 1), round(anchor["peak_alloc_gib"], 1)),
                "memory_ratio": ours["peak_alloc_gib"] / anchor["peak_alloc_gib"],
                "ours_mfu_vs_790": ours.get("mfu_vs_790"),
                "anchor_mfu_vs_790": ours.get("flops_per_token", 0) * anchor["tok_s_per_gpu"] / 790e12,
            }
            print("RATIO " + json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
