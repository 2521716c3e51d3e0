"""Training throughput: lora-ds against HF Trainer + PEFT + DeepSpeed ZeRO-3, same shape, batch, length, steps.

    deepspeed --num_gpus 2 bench/throughput.py --stack ours   --model preset:pythia-6.9b --micro_batch 4
    deepspeed --num_gpus 2 bench/throughput.py --stack anchor --model preset:pythia-6.9b --micro_batch 4
    bench/run_gpu.sh OUT_DIR      # both stacks and the ratios in one run (what bench/results/ holds)

Both stacks train random-weight models built from the same config, on random tokens at full length
(every token a target), bf16, ZeRO-3, LoRA r=16 on the same modules. Step times are taken between
CUDA synchronizations around each optimizer step; the first --warmup_steps are discarded and the
median of the rest is reported. Rank 0 prints one JSON line.

FLOP accounting (model FLOPs per token; recomputation is not counted):
    frozen matmuls   4·N_frozen   forward 2N + backward 2N (input gradients only: frozen weights get none)
    LoRA matmuls     6·N_lora     forward, input and weight gradients
    attention        12·L·s·d     QKᵀ and A·V, 4·s·d per layer forward, twice that backward, not causal-halved
N_frozen counts the weights of every Linear layer including the LM head (embeddings excluded), N_lora
the A and B factors, L layers, s sequence length, d model width.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

PEAK_BF16_TFLOPS = 790.0  # measured dense bf16 matmul peak of one H200 (device notes)


def flops_per_token(model, seq: int) -> float:
    from lora_ds.lora import LoRALinear
    from lora_ds.zero import full_numel

    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    factors = [f for m in lora_layers for f in (m.lora_A, m.lora_B)]
    factor_ids = {id(f) for f in factors}
    frozen = sum(full_numel(m.weight) for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and id(m) not in factor_ids)
    lora = sum(full_numel(f.weight) for f in factors)
    cfg = model.config
    return 4 * frozen + 6 * lora + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_rows(n: int, seq: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": list(range(seq))})
    return rows


def run_ours(args) -> tuple[list[float], object]:
    from lora_ds.config import parse_config, resolve_ds_config
    from lora_ds.data import StepSampler
    from lora_ds.dist import init_distributed
    from lora_ds.engine import build_engine
    from lora_ds.lora import inject_lora, lora_parameters
    from lora_ds.loss import defer_lm_head
    from lora_ds.model import build_model
    from lora_ds.train_loop import Loop

    flags = ["--model", args.model, "--ds_config", args.ds_config, "--micro_batch", str(args.micro_batch),
             "--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r), "--lora_targets", args.targets,
             "--max_steps", str(args.steps), "--dtype", "bf16"] + (["--grad_ckpt"] if args.grad_ckpt else [])
    cfg = parse_config(flags)
    env = init_distributed()
    ds_config = resolve_ds_config(cfg, env.world_size)
    model, keepalive = build_model(cfg.model.name, "bf16", ds_config, cfg.model.attn_implementation)
    inject_lora(model, cfg.lora.target_spec(), cfg.lora.r, cfg.lora.alpha, seed=0)
    defer_lm_head(model)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = lora_parameters(model)
    engine = build_engine(model, list(lora.values()), cfg, ds_config, args.steps)
    rows = synthetic_rows(args.micro_batch * env.world_size * args.steps, args.seq, model.config.vocab_size)
    sampler = StepSampler(len(rows), args.micro_batch, 1, env.world_size, seed=0)
    loop = Loop(engine=engine, rows=rows, eval_rows=None, sampler=sampler, pad_id=0, total_steps=args.steps,
                output_dir=tempfile.mkdtemp(), log_every=1, eval_every=0, save_every=0, halt_at_step=0,
                save_fn=None, rank=env.rank, world=env.world_size, device=engine.device)
    engine.train()
    times = []
    for step in range(args.steps):
        profiling = args.profile and step == args.steps - 1
        if profiling:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
        sync()
        start = time.perf_counter()
        loop.train_step(step)
        sync()
        times.append(time.perf_counter() - start)
        if profiling:
            prof.__exit__(None, None, None)
            if env.rank == 0:
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
    return times, model


def run_anchor(args) -> tuple[list[float], object]:
    """HF Trainer + PEFT + DeepSpeed ZeRO-3, as users glue them today."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lora_ds.model import preset_config

    with open(args.ds_config) as f:
        ds = json.load(f)
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.micro_batch,
                              gradient_accumulation_steps=1, max_steps=args.steps, bf16=True, deepspeed=ds,
                              learning_rate=2e-4, weight_decay=0.1, max_grad_norm=1.0, save_strategy="no",
                              logging_steps=10**6, report_to=[], remove_unused_columns=False,
                              gradient_checkpointing=args.grad_ckpt, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_config(preset_config(args.model[len("preset:"):]), dtype=torch.bfloat16,
                                             attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                             target_modules=args.targets.split(","), task_type="CAUSAL_LM"))
    world = int(os.environ.get("WORLD_SIZE", 1))
    rows = synthetic_rows(args.micro_batch * world * args.steps, args.seq, model.config.vocab_size)
    dataset = [{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"]),
                "attention_mask": torch.ones(args.seq, dtype=torch.long)} for r in rows]
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync()
            times.append(time.perf_counter() - self.start)

    Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[StepTimer()]).train()
    return times, model.get_base_model()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["ours", "anchor"], required=True)
    parser.add_argument("--model", default="preset:pythia-6.9b")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json")
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup_steps", type=int, default=4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--targets", default="query_key_value")
    parser.add_argument("--grad_ckpt", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the last step")
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, model = (run_ours if args.stack == "ours" else run_anchor)(args)
    import torch.distributed as dist

    from lora_ds.dist import shutdown

    world = dist.get_world_size()
    cuda = torch.cuda.is_available()
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                         torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0],
                        device="cuda" if cuda else "cpu")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    steady = times[args.warmup_steps:]
    median = statistics.median(steady)
    tokens_per_gpu = args.micro_batch * args.seq / median
    fpt = flops_per_token(model, args.seq) if args.stack == "ours" else None
    if dist.get_rank() == 0:
        record = {
            "stack": args.stack, "tag": args.tag, "model": args.model, "gpus": world,
            "gpu": torch.cuda.get_device_name() if cuda else "cpu", "micro_batch": args.micro_batch, "seq": args.seq,
            "lora_r": args.lora_r, "targets": args.targets, "grad_ckpt": args.grad_ckpt,
            "ds_config": args.ds_config, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "median_step_s": median, "step_s": [round(t, 4) for t in times],
            "tok_s_per_gpu": tokens_per_gpu, "peak_alloc_gib": peak[0].item(), "peak_reserved_gib": peak[1].item(),
            "date": time.strftime("%Y-%m-%d"),
        }
        if fpt:
            record["flops_per_token"] = fpt
            record["model_tflops_per_gpu"] = fpt * tokens_per_gpu / 1e12
            record["mfu_vs_790"] = record["model_tflops_per_gpu"] / PEAK_BF16_TFLOPS
        print("BENCH " + json.dumps(record), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
