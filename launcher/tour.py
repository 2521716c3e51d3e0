"""`make demo`: the whole journey on the shipped WikiSQL sample, in about 3 minutes on a 2-core CPU (or a GPU).

    make demo                                    # = python launcher/tour.py
    python launcher/tour.py --out runs/demo2     # elsewhere
    python launcher/tour.py --max_steps 40       # shorter (the test's variant)

Each step is the command a user would type, printed before it runs, its output in OUT/logs/<step>.log:
    base     a random tiny GPT-NeoX saved as a model dir, so that train, merge and eval share its weights
    prep     lora-ds prep wikisql: launcher/demo/wikisql/ (WikiSQL's own format) -> prepared train and dev dirs
    train    launcher/train.py under ZeRO-3 (2 CPU ranks, or every GPU) -> checkpoints, adapter, metrics
    export   lora-ds export-adapter from the ZeRO-3 checkpoint (checked against the trainer's own adapter)
    merge    lora-ds merge --verify into the base
    eval     lora-ds eval of the merged model on the dev questions: WikiSQL's logical-form and execution accuracy
    plot     lora-ds plot: the loss curves
Then OUT/summary.json and a printout: where each artifact is, and the same commands for a real model. The first
step that fails stops the tour (its log's end is shown) with a status other than 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lora_ds.errors import UserError
from lora_ds.fsutil import atomic_dir, read_json, write_json

REPO = Path(__file__).resolve().parents[1]

SAMPLE = REPO / "launcher" / "demo" / "wikisql"
TOKENIZER = SAMPLE / "tokenizer"
PRESET = "tiny-gpt-neox"
SEED = 42
# transformers draws a random output layer at std 0.02: after the final norm (|h| = √64 here) no logit can pass
# about ±1.3, so no LoRA could take the loss far below ln(vocab). At 0.15 the frozen random base can express a
# confident next token, as a pretrained one does, and the loss falls as it would there.
INIT_STD = 0.15
# Every linear layer of the tiny base, at a high rate: the sample is learnt in a few hundred steps. A real model
# learns the task with the default targets (attention query and value) at about --lr 2e-4.
TRAIN_FLAGS = {
    "lora_targets": "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
    "lora_r": 16,
    "lora_alpha": 32,
    "lr": 2e-2,
    "warmup": 10,
    "report_to": "tensorboard",
}
GLOBAL_BATCH = 32
MAX_STEPS = 160
TOUR_FILES = ("summary.json", "logs")  # what marks a dir as a tour's own, which the next tour replaces
REAL_MODEL = """\
    lora-ds prep wikisql --src data/wikisql/train.jsonl --tokenizer /models/llama-3-8b --out prepared/wikisql
    lora-ds prep wikisql --src data/wikisql/dev.jsonl --split dev --tokenizer /models/llama-3-8b \\
        --out prepared/wikisql-dev
    deepspeed --num_gpus 8 launcher/train.py --model /models/llama-3-8b --data prepared/wikisql \\
        --eval_data prepared/wikisql-dev --output_dir runs/wikisql --max_steps 2000 --report_to tensorboard
    #   on Slurm: sbatch slurm/train.sh --model /models/llama-3-8b --data prepared/wikisql --output_dir runs/wikisql
    lora-ds export-adapter --checkpoint runs/wikisql/checkpoints --out runs/wikisql/adapter-latest
    lora-ds merge --base /models/llama-3-8b --adapter runs/wikisql/adapter --out merged/llama-3-8b-wikisql \\
        --dtype bf16 --verify
    lora-ds eval --model merged/llama-3-8b-wikisql --task wikisql --data data/wikisql/dev.jsonl --out evals/wikisql
    lora-ds plot runs/wikisql"""


class StepFailed(Exception):
    """A step's command failed; its exit status becomes the tour's."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def shown(path) -> str:
    """`path` as the printed commands name it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


class Tour:
    """The steps, in order; `run` executes a command, prints it and keeps its output in OUT/logs/."""

    STEPS = ("base", "prep", "train", "export", "merge", "eval", "plot")

    def __init__(self, out: Path, max_steps: int, master_port: int):
        import torch

        self.out, self.max_steps, self.master_port = out, max_steps, master_port
        self.gpus = torch.cuda.device_count()
        self.world = self.gpus or 2
        self.dtype = "bf16" if self.gpus else "fp32"  # bf16 matmuls are slower than fp32 ones on most CPUs
        if not self.gpus:  # also for this process, which DeepSpeed would warn that it found no GPU
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.summary = {"artifacts": {}, "seconds": {}}
        self.artifact = self.summary["artifacts"]

    def path(self, *parts) -> str:
        return shown(self.out.joinpath(*parts))

    def run(self, step: str, argv: list[str], env: dict | None = None) -> str:
        """Run `argv` (its first word `lora-ds` or `deepspeed`, as a user types it) from the repository root;
        its output goes to OUT/logs/<step>.log and is returned."""
        prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
        print(f"  $ {prefix}{shlex.join(argv)}", flush=True)
        program = {
            "lora-ds": [sys.executable, "-m", "lora_ds"],
            "deepspeed": [str(Path(sys.executable).parent / "deepspeed")],
        }
        command = program[argv[0]] + argv[1:]
        log = self.out / "logs" / f"{step}.log"
        with open(log, "a") as f:
            f.write(f"$ {prefix}{shlex.join(argv)}\n")
            f.flush()
            proc = subprocess.run(
                command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=f, text=True
            )
            f.write(proc.stdout)
        if proc.returncode != 0:
            tail = [line for line in log.read_text().splitlines() if not line.startswith("$ ")][-25:]
            raise StepFailed(
                f"step {step}: `{argv[0]} {argv[1]} ...` exited with status {proc.returncode}; the end of its "
                f"output (all of it in {shown(log)}):\n" + "\n".join("    " + line for line in tail),
                proc.returncode,
            )
        return proc.stdout

    # ---- the steps ----

    def base(self) -> None:
        """A preset's random weights in one process from SEED, saved as a model dir with the demo's tokenizer."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        from lora_ds.model import preset_config
        from lora_ds.tokenizer import load_tokenizer

        tok = load_tokenizer(str(TOKENIZER))
        config = preset_config(PRESET, tok.vocab_size)
        config.initializer_range = INIT_STD
        config.bos_token_id = tok.bos_token_id
        config.eos_token_id = tok.eos_token_id
        config.pad_token_id = tok.pad_token_id
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        logging.disable_progress_bar()
        with atomic_dir(str(self.out / "base")) as tmp:
            model.save_pretrained(tmp)
            shutil.copytree(TOKENIZER, tmp, dirs_exist_ok=True)
        self.artifact["base"] = self.path("base")
        params = sum(p.numel() for p in model.parameters())
        print(f"  preset:{PRESET} ({params:,} params), seed {SEED}, init std {INIT_STD} -> {self.path('base')}")

    def prep(self) -> None:
        for split in ("train", "dev"):
            extra = ["--split", split] if split != "train" else []
            out = self.run(
                "prep",
                ["lora-ds", "prep", "wikisql", "--src", shown(SAMPLE / f"{split}.jsonl"), *extra]
                + ["--tokenizer", self.path("base"), "--out", self.path("prepared", split)],
            )
            print("  " + out.strip().splitlines()[-1])
        self.artifact["prepared"] = self.path("prepared")

    def train(self) -> None:
        flags = {
            **TRAIN_FLAGS,
            "model": self.path("base"),
            "data": self.path("prepared", "train"),
            "eval_data": self.path("prepared", "dev"),
            "output_dir": self.path("train"),
            "dtype": self.dtype,
            "micro_batch": max(1, GLOBAL_BATCH // self.world),
            "max_steps": self.max_steps,
            "eval_every": max(1, self.max_steps // 4),
            "ds_config": "ds_configs/zero3.json",
        }
        env = {} if self.gpus else {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": self._threads_per_rank()}
        ranks = [] if self.gpus else ["--num_gpus", "2"]
        argv = ["deepspeed", *ranks, "--master_port", str(self.master_port), "launcher/train.py"]
        self.run("train", argv + [word for k, v in flags.items() for word in (f"--{k}", str(v))], env)
        self.summary["loss"] = loss = loss_fall(self.out / "train" / "metrics.jsonl")
        print(
            f"  loss {loss['first']:.3f} (step 1) -> {loss['last']:.3f} (mean of the last {loss['last_n']} steps): "
            f"{loss['fall']:.0%} lower; eval loss {loss['eval_loss']:.3f} on {self.path('prepared', 'dev')}"
        )
        for name in ("metrics.jsonl", "adapter", "checkpoints", "tensorboard"):
            self.artifact[f"train/{name}"] = self.path("train", name)

    def _threads_per_rank(self) -> str:
        """One OpenMP pool per rank sized to its share of the cores: two ranks each spinning as many threads as the
        machine has cores run several times slower."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // self.world))

    def export(self) -> None:
        report = last_json(
            self.run(
                "export",
                ["lora-ds", "export-adapter", "--checkpoint", self.path("train", "checkpoints")]
                + ["--out", self.path("adapter")],
            )
        )
        differing = compare_adapters(self.out / "adapter", self.out / "train" / "adapter")
        if differing:
            raise StepFailed(f"export: the exported adapter differs from the trainer's in {', '.join(differing[:3])}")
        self.summary["export"] = {"equals_trainer_adapter": True, "modules": report["modules"]}
        self.artifact["adapter"] = self.path("adapter")
        print(
            f"  {report['modules']} modules, {report['params']:,} params from {report['world_size']} ranks' "
            f"partitions; equal to the trainer's {self.path('train', 'adapter')}, tensor for tensor"
        )

    def merge(self) -> None:
        report = last_json(
            self.run(
                "merge",
                ["lora-ds", "merge", "--base", self.path("base"), "--adapter", self.path("adapter")]
                + ["--out", self.path("merged"), "--verify"],
            )
        )
        verify = report["verify"]
        self.summary["merge"] = {"verified": True, **verify}
        self.artifact["merged"] = self.path("merged")
        print(
            f"  verified: merged and base+adapter logits differ by {verify['max_abs_diff']:.2g} at most "
            f"(tolerance {verify['tolerance']:.2g}); the adapter moves them by {verify['adapter_effect']:.3g}"
        )

    def eval(self) -> None:
        out = self.run(
            "eval",
            ["lora-ds", "eval", "--model", self.path("merged"), "--task", "wikisql", "--dtype", self.dtype]
            + ["--data", shown(SAMPLE / "dev.jsonl"), "--out", self.path("eval"), "--no_progress"],
        )
        print("\n".join("  " + line for line in out.strip().splitlines()[-3:]))
        self.summary["eval"] = read_json(str(self.out / "eval" / "metrics.json"))["metrics"]["dev"]
        with open(self.out / "eval" / "predictions.jsonl") as f:
            rows = [json.loads(line) for line in f]
        for lf in (1, 0):  # one question it gets right and one it gets wrong, where there are such
            for row in [r for r in rows if r["score"]["lf"] == lf][:1]:
                question = row["prompt"].splitlines()[1]
                print(f"  {question}  ->  {row['prediction']}  ({'right' if lf else 'wrong'})")
        self.artifact["eval/metrics.json"] = self.path("eval", "metrics.json")
        self.artifact["eval/predictions.jsonl"] = self.path("eval", "predictions.jsonl")

    def plot(self) -> None:
        out = self.run("plot", ["lora-ds", "plot", self.path("train"), "--out", self.path("plots")])
        figures = [shown(line) for line in out.split()]
        self.artifact["plots"] = self.path("plots")
        self.summary["plots"] = figures
        print("  " + "  ".join(figures))

    def start(self) -> None:
        """OUT fresh: a previous tour's (or the trainer's own demo run, the old `make demo`) is replaced; any other
        is refused."""
        if self.out.exists() and any(self.out.iterdir()):
            if not any((self.out / n).exists() for n in TOUR_FILES) and not is_trainer_demo(self.out):
                raise UserError(
                    f"--out {shown(self.out)}: a dir the tour did not write; remove it or pick another --out"
                )
            shutil.rmtree(self.out)
        (self.out / "logs").mkdir(parents=True)

    def all(self) -> None:
        began = time.perf_counter()
        self.start()
        where = f"{self.gpus} GPU(s)" if self.gpus else "2 CPU ranks (DeepSpeed's CPU accelerator, gloo)"
        print(f"lora-ds demo: WikiSQL on a random tiny GPT-NeoX, ZeRO-3 on {where}, into {self.path()}", flush=True)
        for i, name in enumerate(self.STEPS, 1):
            print(f"[{i}/{len(self.STEPS)}] {name}", flush=True)
            step_began = time.perf_counter()
            getattr(self, name)()
            self.summary["seconds"][name] = round(time.perf_counter() - step_began, 1)
            print(f"  ({self.summary['seconds'][name]:.0f} s)", flush=True)
        self.summary["seconds"]["total"] = round(time.perf_counter() - began, 1)
        write_json(str(self.out / "summary.json"), self.summary)
        self.report()

    def report(self) -> None:
        print(f"\nDone in {self.summary['seconds']['total']:.0f} s. Artifacts:")
        width = max(map(len, self.artifact))
        for name, path in {**self.artifact, "summary": self.path("summary.json"), "logs": self.path("logs")}.items():
            print(f"  {name:<{width}}  {path}")
        print(f"  tensorboard --logdir {self.path('train', 'tensorboard')}    # the same curves in TensorBoard")
        print("\nThe same on a real model (a Hugging Face model dir and the WikiSQL release's files):")
        print(REAL_MODEL)


def is_trainer_demo(out: Path) -> bool:
    """Whether `out` holds a run of launcher/train.py with no arguments (what `make demo` wrote before the tour)."""
    path = out / "run_config.json"
    run = json.loads(path.read_text()) if path.is_file() else {}
    return run.get("model", {}).get("name") == "preset:tiny-gpt-neox" and run.get("data", {}).get("path", "").endswith(
        os.path.join("launcher", "demo", "train.jsonl")
    )


def loss_fall(metrics_path: Path, last_n: int = 10) -> dict:
    """The training loss of step 1 against the mean of the last `last_n` steps', and the final eval loss."""
    from lora_ds.plots import read_metrics

    records = read_metrics(str(metrics_path))
    losses = [r["loss"] for r in records if "loss" in r]
    last = sum(losses[-last_n:]) / len(losses[-last_n:])
    eval_loss = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    return {
        "first": losses[0],
        "last": last,
        "last_n": len(losses[-last_n:]),
        "fall": 1 - last / losses[0],
        "eval_loss": eval_loss,
        "steps": records[-1]["step"],
    }


def compare_adapters(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (or that only one holds) between two adapter dirs."""
    from safetensors.torch import load_file

    ta, tb = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    return sorted(set(ta) ^ set(tb)) + sorted(k for k in set(ta) & set(tb) if not ta[k].equal(tb[k]))


def last_json(stdout: str) -> dict:
    """The JSON report a lora-ds command prints last (export-adapter, merge)."""
    start = stdout.rfind("\n{") + 1
    return json.loads(stdout[start:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="where every artifact goes (default runs/demo)")
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS, help=f"training steps (default {MAX_STEPS})")
    parser.add_argument("--master_port", type=int, default=29500, help="the deepspeed launcher's (default 29500)")
    args = parser.parse_args(argv)
    try:
        if args.max_steps < 1:
            raise UserError(f"--max_steps {args.max_steps}: must be at least 1")
        Tour(Path(args.out).resolve(), args.max_steps, args.master_port).all()
    except UserError as e:
        print(f"tour: error: {e}", file=sys.stderr)
        return 2
    except StepFailed as e:
        print(f"tour: error: {e}", file=sys.stderr)
        return e.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
