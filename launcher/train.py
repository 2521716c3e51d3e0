"""LoRA fine-tuning on DeepSpeed ZeRO-3: config -> ranks -> model -> data -> engine -> loop -> adapter.

    deepspeed launcher/train.py --ds_config ds_configs/zero3.json          # the demo, on every local GPU
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launcher/train.py            # the demo on 2 CPU ranks (gloo)
    deepspeed --num_gpus 8 launcher/train.py --model /models/llama-7b --data prepared/wikisql \\
        --output_dir runs/wikisql --lora_r 8 --max_steps 2000                # a real model, one node
    deepspeed --hostfile hosts launcher/train.py ...                       # several nodes over ssh
    sbatch slurm/gpt_neox.sh                                               # Slurm (srun, no ssh)
    mpirun -np 16 python launcher/train.py ...                             # MPI (ranks via mpi4py)

With no arguments it trains the embedded demo: a tiny GPT-NeoX (random weights) on launcher/demo/
into runs/demo/. `--help` lists every flag; `--config FILE` (YAML/JSON) sets the same fields.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from lora_ds import checkpoint
from lora_ds.adapter import peft_config, write_adapter
from lora_ds.config import DEMO_DIR, parse_config, resolve_ds_config
from lora_ds.data import StepSampler, load_rows
from lora_ds.dist import init_distributed, shutdown
from lora_ds.engine import build_engine
from lora_ds.errors import UserError
from lora_ds.fsutil import write_json
from lora_ds.lora import inject_lora, lora_parameters
from lora_ds.loss import defer_lm_head
from lora_ds.model import DTYPES, build_model, check_model_dir, default_targets, preset_config
from lora_ds.tokenizer import load_tokenizer, tokenizer_record
from lora_ds.train_loop import Loop, StopSignal, report_stopped
from lora_ds.zero import full_numel


def lora_fp32_state(engine, params: dict) -> dict:
    """Full fp32 LoRA tensors from the optimizer's master copies (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in params.items()}


def main(argv: list[str] | None = None) -> int:
    """Train; the exit status says how it ended. Every normal end is reached by all ranks together."""
    code = train(argv)
    shutdown()
    return code


def train(argv: list[str] | None) -> int:
    cfg = parse_config(argv)
    # Before the (long) start-up: a preemption notice that arrives now is remembered, not fatal.
    stop = StopSignal()
    # Inputs are checked before the process group starts, so bad input fails fast and alike on every rank.
    is_preset = cfg.model.name.startswith("preset:")
    if is_preset:
        preset_config(cfg.model.name[len("preset:"):])
    else:
        check_model_dir(cfg.model.name)
    tok = load_tokenizer(cfg.model.tokenizer or (os.path.join(DEMO_DIR, "tokenizer") if is_preset
                                                 else cfg.model.name))
    rows = load_rows(cfg.data.path, tok, cfg.data.max_len)
    eval_rows = load_rows(cfg.data.eval_path, tok, cfg.data.max_len) if cfg.data.eval_path else None
    ckpt_root = os.path.join(cfg.train.output_dir, "checkpoints")
    tag = checkpoint.resolve_tag(ckpt_root, cfg.train.resume)

    env = init_distributed()
    rank, world = env.rank, env.world_size
    ds_config = resolve_ds_config(cfg, world)
    torch.manual_seed(cfg.train.seed)
    sampler = StepSampler(len(rows), cfg.train.micro_batch, cfg.train.grad_accum, world, cfg.train.seed)
    total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * sampler.steps_per_epoch))

    model, keepalive = build_model(cfg.model.name, cfg.model.dtype, ds_config, cfg.model.attn_implementation,
                                   vocab_size=tok.vocab_size)
    targets = cfg.lora.target_spec() or default_targets(model)
    adapted = inject_lora(model, targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.rslora,
                          seed=cfg.train.seed)
    defer_lm_head(model)
    if cfg.model.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = lora_parameters(model)
    engine = build_engine(model, list(lora.values()), cfg, ds_config, total_steps)

    out = cfg.train.output_dir
    trainable = sum(full_numel(p) for p in lora.values())
    run_record = {
        **cfg.to_dict(),
        "resolved": {
            "world_size": world, "rank_source": env.source, "total_steps": total_steps,
            "steps_per_epoch": sampler.steps_per_epoch, "lora_targets": targets, "adapted_modules": adapted,
            "trainable_params": trainable, "total_params": sum(full_numel(p) for p in model.parameters()),
            "tokenizer": tokenizer_record(tok), "ds_config": ds_config,
            "versions": {"torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__,
                         "transformers": __import__("transformers").__version__},
        },
    }
    adapter_config = peft_config(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                 target_modules=targets, use_rslora=cfg.lora.rslora,
                                 fan_in_fan_out=any(m.fan_in_fan_out for m in model.modules()
                                                    if hasattr(m, "fan_in_fan_out")),
                                 base_model=cfg.model.name)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "run_config.json"), run_record)

    start_step = 0
    if tag is not None:
        start_step = checkpoint.load(engine, ckpt_root, tag)["step"]
        if rank == 0:
            print(f"resumed from {os.path.join(ckpt_root, tag)} at step {start_step}", flush=True)

    def save(step: int) -> str:
        state = {"step": step, "samples": step * sampler.per_step, "world_size": world, "time": time.time()}
        return checkpoint.save(engine, ckpt_root, step, state,
                               {"adapter_config.json": adapter_config, "run_config.json": run_record},
                               cfg.train.keep_checkpoints)

    task_eval = None
    if cfg.data.eval_task:
        from lora_ds.evaluation import TaskEval

        task_eval = TaskEval(cfg.data.eval_task, cfg.data.eval_task_samples, cfg.train.seed, tok,
                             max_len=cfg.data.max_len, batch_size=cfg.train.micro_batch, output_dir=out, rank=rank,
                             world=world, device=engine.device)
    loop = Loop(engine=engine, rows=rows, eval_rows=eval_rows, sampler=sampler, pad_id=tok.pad_token_id,
                total_steps=total_steps, output_dir=out, log_every=cfg.train.log_every,
                eval_every=cfg.train.eval_every, save_every=cfg.train.save_every,
                halt_at_step=cfg.train.halt_at_step, save_fn=save, rank=rank, world=world, device=engine.device,
                max_skipped_steps=cfg.train.max_skipped_steps, mask_dtype=DTYPES[cfg.model.dtype],
                task_eval=task_eval, stop=stop)
    outcome = loop.run(start_step)
    if outcome == "nonfinite":
        last = checkpoint.resolve_tag(ckpt_root, "auto")
        if rank == 0:
            print(f"train: error: more than {cfg.train.max_skipped_steps} steps had NaN/Inf gradients "
                  f"(--max_skipped_steps); stopped without saving. The last good checkpoint is "
                  f"{os.path.join(ckpt_root, last) if last else 'none (no checkpoint was saved)'}; "
                  f"check the data and --lr before resuming", file=sys.stderr, flush=True)
        return 3
    if outcome != "done":
        if rank == 0:
            print(f"stopped after a checkpoint ({outcome}); rerun the same command to resume "
                  "(the Slurm scripts requeue the job, which does so by itself)", flush=True)
            if outcome != "halt":
                report_stopped(checkpoint.resolve_tag(ckpt_root, "auto"))
        return 0 if outcome == "halt" else 124

    tensors = lora_fp32_state(engine, lora)
    if rank == 0:
        write_adapter(os.path.join(out, "adapter"), tensors, adapter_config,
                      extra_json={"run_config.json": run_record})
        print(f"adapter written to {os.path.join(out, 'adapter')} "
              f"({trainable:,} trainable of {run_record['resolved']['total_params']:,} params)", flush=True)
    del keepalive
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main() with bad input reported as one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
