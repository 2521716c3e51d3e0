"""export-adapter and merge: time and peak RSS, one JSON line per measurement.

    python bench/export_merge.py --work /tmp/lora-bench                   # both (~12 GB of disk, cleaned up)
    python bench/export_merge.py --work /tmp/lora-bench --only export
    python bench/export_merge.py --work /tmp/lora-bench --only merge --base_gb 3 --rounds 3

Export: real ZeRO-3 checkpoints written by 2 CPU ranks (the trainer's Recipe, through
tests/programs/train_oracles.py) of one LoRA (r=64 on query_key_value of a 4-layer, 512-wide GPT-NeoX): saved LoRA-
only (1x), and with the frozen base fragments of bases whose vocabulary makes the checkpoint about 10x and 100x
bigger. Each `lora-ds export-adapter` runs as a child process. DeepSpeed's zero_to_fp32 (which reads whole model-
state files) runs on the same checkpoints for contrast, and a child that only imports what export imports gives the
floor. Time and peak RSS come from GNU time (/usr/bin/time).

Merge: a synthetic GPT-NeoX-shaped base (pythia-1.4b shapes, bf16, random) written straight as safetensors
shards, and a random r=16 adapter on every query_key_value. In each round, on the same disk: `cp` of the
shards, then the merge (dtype kept: unchanged tensors are byte-copied), then the merge with --dtype fp16 (every
tensor read, cast and written); each timed as a process, with a sync of the written data. The merge runs
`merge_model_dir` (what `lora-ds merge` runs) in a fresh interpreter that also reports the call's own time,
apart from the ~2.5 s of starting Python and importing torch. Peak RSS is compared with the bound largest
shard + adapter + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANK_PROGRAM = REPO / "tests" / "programs" / "train_oracles.py"
GIB = 1 << 30
MIB = 1 << 20


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def measure(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under GNU time: wall seconds, the command's peak RSS and CPU seconds.

    Not wait4 from this process: a child's peak RSS counts the memory of the process it was forked from,
    and this one has torch loaded; GNU time forks the command from a process of a few MiB.
    """
    stats = log.with_suffix(".time")
    with open(log, "w") as out:
        code = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(stats), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        ).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{log.read_text()[-3000:]}")
    wall, rss_kib, user, system = stats.read_text().split()[-4:]
    return {
        "wall_s": float(wall),
        "peak_rss_mib": round(int(rss_kib) / 1024, 1),
        "cpu_s": round(float(user) + float(system), 2),
    }


def sync_dir(path: Path) -> None:
    """fsync every file under `path`: written data on disk, as a finished copy would be."""
    for f in sorted(path.iterdir()):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- export


def save_base(out: Path, vocab: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neox",
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=256,
        vocab_size=vocab,
        rotary_pct=0.25,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)


def train_checkpoint(base: Path, root: Path, with_frozen: bool) -> None:
    """2 CPU ranks of the trainer: ZeRO-3, 2 steps, checkpoint into `root` (frozen fragments optional)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root.parent  # the trainer writes OUTPUT/checkpoints
    args = [
        sys.executable,
        str(RANK_PROGRAM),
        "--model",
        str(base),
        "--tokenizer",
        str(REPO / "launcher" / "demo" / "tokenizer"),
        "--output_dir",
        str(out),
        "--lora_targets",
        "query_key_value",
        "--lora_r",
        "64",
        "--max_steps",
        "2",
        "--save_every",
        "2",
        "--micro_batch",
        "2",
        "--dtype",
        "fp32",
        "--eval_data",
        "",
        "--oracles",
        str(out / "oracles"),
        *(["--with_frozen"] if with_frozen else []),
    ]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"rank program exited {codes} for {root}")


# export_adapter in a fresh interpreter, timing the call itself apart from interpreter start and imports.
EXPORT_TIMED = (
    "import json, sys, time; from lora_ds.consolidate import export_adapter; "
    "t = time.perf_counter(); export_adapter(sys.argv[1], sys.argv[2]); "
    "print(json.dumps({'export_s': round(time.perf_counter() - t, 3)}))"
)


def bench_export(work: Path, repeats: int) -> None:
    # Vocabularies chosen so that the frozen fragments make the checkpoint ~10x and ~100x the LoRA-only one.
    cases = [("1x", 1536, False), ("10x", 1536, True), ("100x", 140_000, True)]
    checkpoints = {}
    for name, vocab, with_frozen in cases:
        base = work / f"export_base_v{vocab}"
        if not base.exists():
            save_base(base, vocab)
        root = work / f"export_{name}" / "checkpoints"
        train_checkpoint(base, root, with_frozen)
        checkpoints[name] = root
    lora_only = dir_bytes(checkpoints["1x"] / "step_00000002")
    floor_cmd = [
        sys.executable,
        "-c",
        "import lora_ds.consolidate, safetensors.torch; "
        "from lora_ds.checkpoint_files import deepspeed_safe_globals; deepspeed_safe_globals()",
    ]
    floor = statistics.median(measure(floor_cmd, work / "floor.log")["peak_rss_mib"] for _ in range(repeats))
    emit({"bench": "export", "case": "import floor", "peak_rss_mib": floor})
    for name, root in checkpoints.items():
        size = dir_bytes(root / "step_00000002")
        runs = []
        for _ in range(repeats):
            log = work / f"export_{name}.log"
            runs.append(measure([sys.executable, "-c", EXPORT_TIMED, str(root), str(work / f"adapter_{name}")], log))
            runs[-1].update(json.loads(log.read_text().splitlines()[-1]))
        emit(
            {
                "bench": "export",
                "case": name,
                "checkpoint_mib": round(size / MIB, 1),
                "size_vs_lora_only": round(size / lora_only, 1),
                "export_s": statistics.median(r["export_s"] for r in runs),
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                "peak_rss_over_floor_mib": round(statistics.median(r["peak_rss_mib"] for r in runs) - floor, 1),
                "runs": runs,
            }
        )
        ds_cmd = [
            sys.executable,
            "-c",
            "import sys; from deepspeed.utils.zero_to_fp32 import "
            "get_fp32_state_dict_from_zero_checkpoint as f; f(sys.argv[1], exclude_frozen_parameters=True)",
            str(root),
        ]
        ds = measure(ds_cmd, work / f"zero_to_fp32_{name}.log")
        emit({"bench": "export", "case": name, "tool": "deepspeed zero_to_fp32 (contrast)", **ds})


# ---------------------------------------------------------------- merge


def neox_shapes(hidden: int, layers: int, inter: int, vocab: int) -> dict:
    """{key: shape} of a GPT-NeoX causal LM as transformers saves it."""
    shapes = {
        "gpt_neox.embed_in.weight": (vocab, hidden),
        "embed_out.weight": (vocab, hidden),
        "gpt_neox.final_layer_norm.weight": (hidden,),
        "gpt_neox.final_layer_norm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "input_layernorm.bias": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.bias": (hidden,),
                p + "attention.query_key_value.weight": (3 * hidden, hidden),
                p + "attention.query_key_value.bias": (3 * hidden,),
                p + "attention.dense.weight": (hidden, hidden),
                p + "attention.dense.bias": (hidden,),
                p + "mlp.dense_h_to_4h.weight": (inter, hidden),
                p + "mlp.dense_h_to_4h.bias": (inter,),
                p + "mlp.dense_4h_to_h.weight": (hidden, inter),
                p + "mlp.dense_4h_to_h.bias": (hidden,),
            }
        )
    return shapes


def write_synthetic_base(out: Path, base_gb: float, shard_gb: float) -> dict:
    """A bf16 GPT-NeoX dir (pythia-1.4b widths, layers scaled to `base_gb`) in shards of about `shard_gb`."""
    import math

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    hidden, inter, vocab = 2048, 8192, 50304
    per_layer = 12 * hidden * hidden + 13 * hidden + inter
    layers = max(1, round((base_gb * GIB / 2 - 2 * vocab * hidden) / per_layer))
    shapes = neox_shapes(hidden, layers, inter, vocab)
    out.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_gb * GIB:
            shards.append(current)
            current, size = {}, 0
        current[key] = shape
        size += nbytes
    shards.append(current)
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in keys.items()}
        save_file(tensors, out / name, metadata={"format": "pt"})
        del tensors
        weight_map.update({k: name for k in keys})
    total = sum(2 * math.prod(s) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    AutoConfig.for_model(
        "gpt_neox",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        intermediate_size=inter,
        vocab_size=vocab,
        rotary_pct=0.25,
        dtype="bfloat16",
    ).save_pretrained(out)
    return {"layers": layers, "hidden": hidden, "vocab": vocab, "shards": len(shards), "total_bytes": total}


def write_adapter_for(base_info: dict, out: Path, r: int = 16) -> None:
    import torch

    from lora_ds.adapter import peft_config, write_adapter

    hidden, generator = base_info["hidden"], torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(base_info["layers"]):
        module = f"gpt_neox.layers.{i}.attention.query_key_value"
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, hidden, generator=generator) * 0.02
        tensors[f"{module}.lora_B.weight"] = torch.randn(3 * hidden, r, generator=generator) * 0.02
    write_adapter(
        str(out),
        tensors,
        peft_config(
            r=r,
            alpha=2 * r,
            dropout=0.0,
            target_modules=["query_key_value"],
            use_rslora=False,
            fan_in_fan_out=False,
            base_model="synthetic",
        ),
    )


# merge_model_dir (what `lora-ds merge` runs) in a fresh interpreter, timing the call apart from start-up.
MERGE_TIMED = (
    "import json, sys, time; from lora_ds.merge import merge_model_dir; t = time.perf_counter(); "
    "merge_model_dir(*sys.argv[1:4], dtype=(sys.argv[4:] or [None])[0]); "
    "print(json.dumps({'merge_call_s': round(time.perf_counter() - t, 3)}))"
)


def bench_merge(work: Path, base_gb: float, shard_gb: float, rounds: int, cast: bool) -> None:
    base, adapter = work / "merge_base", work / "merge_adapter"
    info = write_synthetic_base(base, base_gb, shard_gb)
    write_adapter_for(info, adapter)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    adapter_bytes = dir_bytes(adapter)
    bound_mib = (largest + adapter_bytes + GIB) / MIB
    emit(
        {
            "bench": "merge",
            "case": "setup",
            **info,
            "base_mib": round(info["total_bytes"] / MIB, 1),
            "largest_shard_mib": round(largest / MIB, 1),
            "adapter_mib": round(adapter_bytes / MIB, 1),
            "rss_bound_mib": round(bound_mib, 1),
        }
    )
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # same cache state for all
    cases = [("cp", None), ("merge", [])] + ([("merge --dtype fp16", ["--dtype", "fp16"])] if cast else [])
    results = {name: [] for name, _ in cases}
    for _ in range(rounds):
        for name, flags in cases:
            out = work / "merge_out"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            if flags is None:
                out.mkdir()
                cmd = ["cp", *map(str, shards), str(out)]
            else:
                cmd = [sys.executable, "-c", MERGE_TIMED, str(base), str(adapter), str(out), *flags[1:]]
            start = time.perf_counter()
            run = measure(cmd, work / "merge.log")
            sync_dir(out)
            run["wall_with_sync_s"] = round(time.perf_counter() - start, 3)
            if flags is not None:
                run.update(json.loads((work / "merge.log").read_text().splitlines()[-1]))
            results[name].append(run)
            emit({"bench": "merge", "case": name, **run})
    shutil.rmtree(work / "merge_out", ignore_errors=True)
    cp = statistics.median(r["wall_with_sync_s"] for r in results["cp"])
    for name in list(results)[1:]:
        t = statistics.median(r["wall_with_sync_s"] for r in results[name])
        call = statistics.median(r["merge_call_s"] for r in results[name])
        rss = max(r["peak_rss_mib"] for r in results[name])
        emit(
            {
                "bench": "merge",
                "case": f"summary: {name}",
                "median_wall_with_sync_s": t,
                "cp_median_s": cp,
                "speed_vs_cp": round(cp / t, 3),
                "median_merge_call_s": call,
                "call_speed_vs_cp": round(cp / call, 3),
                "gib_per_s": round(info["total_bytes"] / GIB / t, 3),
                "peak_rss_mib": rss,
                "rss_bound_mib": round(bound_mib, 1),
                "within_bound": rss <= bound_mib,
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="scratch dir on the disk to measure (removed at the end)")
    parser.add_argument("--only", choices=["export", "merge"], default=None)
    parser.add_argument("--base_gb", type=float, default=3.0, help="merge: size of the synthetic base")
    parser.add_argument("--shard_gb", type=float, default=1.0, help="merge: max shard size")
    parser.add_argument("--rounds", type=int, default=2, help="merge: cp/merge rounds (medians reported)")
    parser.add_argument(
        "--cast",
        choices=["fp16", "none"],
        default="fp16",
        help="merge: also time `merge --dtype fp16` (every tensor read, cast, written)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="export: runs per checkpoint (medians reported)")
    parser.add_argument("--keep", action="store_true", help="keep --work")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    emit(
        {
            "bench": "host",
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    try:
        if args.only in (None, "export"):
            bench_export(work, args.repeats)
        if args.only in (None, "merge"):
            bench_merge(work, args.base_gb, args.shard_gb, args.rounds, args.cast != "none")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
