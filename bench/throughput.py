"""Training throughput: lora-ds against HF Trainer + PEFT + DeepSpeed ZeRO-3, with and without Liger kernels.

    deepspeed --num_gpus 1 bench/throughput.py --stack ours --model preset:llama-3-8b --targets q_proj,v_proj
    deepspeed --num_gpus 1 bench/throughput.py --stack anchor-liger --model preset:llama-3-8b --targets q_proj,v_proj
    bench/run_gpu.sh OUT MODEL MICRO TARGETS ROUNDS STACK...    # interleaved rounds + ratios (bench/results/)

Stacks, all bf16 ZeRO-3 with LoRA on the same modules, random-weight models built from the same config, random
tokens at full length (every token a target):
    ours          lora-ds as shipped: lora_ds.build (kernels auto, fetch by layer) and ds_configs/zero3.json;
                  --ours_flags adds launcher flags (e.g. "--kernels off --zero3_fetch module")
    anchor        HF Trainer + PEFT + DeepSpeed, the Hugging Face "auto" ZeRO-3 config (bench/anchor_zero3.json)
    anchor-liger  the same with TrainingArguments(use_liger_kernel=True), as users switch Liger on

Step times come from CUDA events recorded at each step's start on the compute stream (and one after the last):
no synchronisation is added to any step, so a stack's host-side stalls count against it. The first
--warmup_steps are discarded; the median and the best of the rest are reported, with peak allocated memory.
Rank 0 prints one JSON line, `BENCH {...}`.

FLOP accounting ("2F": model FLOPs per token, recomputation not counted, the same for every stack):
    frozen matmuls   4·N_frozen   forward 2N + backward 2N (input gradients only: frozen weights get none)
    LoRA matmuls     6·N_lora     forward, input and weight gradients
    attention        12·L·s·d     QKᵀ and A·V, 4·s·d per layer forward, twice that backward, not causal-halved
N_frozen counts the weights of every Linear layer including the LM head (embeddings excluded), N_lora the A
and B factors, L layers, s sequence length, d model width. MFU is against 790 TFLOP/s, the dense bf16 matmul
rate measured on one H200 here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time
import traceback

import torch

PEAK_BF16_TFLOPS = 790.0


def flops_per_token(model_name: str, targets: list[str], r: int, seq: int) -> float:
    """The 2F model FLOPs per token of the preset `model_name` with rank-r LoRA on `targets` (meta device)."""
    from transformers import AutoModelForCausalLM

    from lora_ds.lora import match_targets
    from lora_ds.model import preset_config

    config = preset_config(model_name[len("preset:") :])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    frozen = sum(m.weight.numel() for m in linear.values())
    lora = sum(r * (linear[n].in_features + linear[n].out_features) for n in match_targets(model, targets))
    return 4 * frozen + 6 * lora + 12 * config.num_hidden_layers * seq * config.hidden_size


def synthetic_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": list(range(seq))})
    return rows


def real_length_rows(path: str, n: int, vocab: int, seed: int = 0) -> list[dict]:
    """`n` rows whose lengths are drawn (seeded, with replacement) from the distribution in `path`
    (bench/lengths_wikisql_samsum.json); random tokens, the loss on each row's second half (its "completion")."""
    with open(path) as f:
        lengths = [n for task in json.load(f)["lengths"].values() for n in task]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        rows.append(
            {
                "id": str(i),
                "input_ids": ids,
                "labels": [-100] * (length // 2) + ids[length // 2 :],
                "position_ids": list(range(length)),
            }
        )
    return rows


class StepEvents:
    """CUDA events at step boundaries; durations are read once, after the last step."""

    def __init__(self):
        self.events = []
        self.tokens = []  # useful (non-padding) tokens of each step, on this rank

    def mark(self) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.events.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if not torch.cuda.is_available():
            return [b - a for a, b in zip(self.events, self.events[1:])]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(self.events, self.events[1:])]


def preset_vocab(model_name: str) -> int:
    from lora_ds.model import preset_config

    return preset_config(model_name[len("preset:") :]).vocab_size


def demo_tokenizer():
    """A tokenizer object for DataCollatorForSeq2Seq's padding (the demo's; pad id 0 is in every vocab)."""
    from transformers import PreTrainedTokenizerFast

    from lora_ds.config import DEMO_DIR

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(DEMO_DIR, "tokenizer", "tokenizer.json"))
    tok.pad_token, tok.pad_token_id = tok.convert_ids_to_tokens(0), 0
    return tok


def run_ours(args, events: StepEvents) -> dict:
    from lora_ds.build import build
    from lora_ds.config import parse_config, resolve_ds_config
    from lora_ds.data import StepSampler, TrainBatches
    from lora_ds.dist import init_distributed
    from lora_ds.train_loop import train_step

    flags = [
        "--model",
        args.model,
        "--ds_config",
        args.ds_config,
        "--micro_batch",
        str(args.micro_batch),
        "--lora_r",
        str(args.lora_r),
        "--lora_alpha",
        str(2 * args.lora_r),
        "--lora_targets",
        args.targets,
        "--max_steps",
        str(args.steps),
        "--dtype",
        "bf16",
        "--seed",
        "0",
        *(["--grad_ckpt"] if args.grad_ckpt else []),
        *shlex.split(args.ours_flags),
    ]
    cfg = parse_config(flags)
    env = init_distributed()
    ds_config = resolve_ds_config(cfg, env.world_size)
    per_step = args.micro_batch * env.world_size
    if args.lengths:  # real-length rows, packed first-fit into rows of --seq tokens, as `lora-ds prep --pack` does
        from lora_ds.packing import pack_rows

        vocab = preset_vocab(args.model)
        rows = pack_rows(real_length_rows(args.lengths, 14 * per_step * (args.steps + 1), vocab), args.seq)
    else:
        rows = synthetic_rows(per_step * (args.steps + 1), args.seq, preset_vocab(args.model))
    trainable, engine = build(cfg, ds_config, args.steps + 1, packed=bool(args.lengths))
    sampler = StepSampler(len(rows), args.micro_batch, 1, env.world_size, seed=0)
    data = TrainBatches(rows, sampler, env.rank, pad_id=0, mask_from_positions=trainable.mask_from_positions)
    engine.train()
    for step in range(args.steps):
        events.mark()
        events.tokens.append(train_step(engine, data, step, engine.device)[1])
    events.mark()
    info = {
        "fused_kernels": trainable.fused,
        "zero3_fetch": cfg.model.zero3_fetch,
        "attn_implementation": trainable.attention,
    }
    if args.profile:
        with Phases(engine):
            info["profile"] = profile_step(lambda: train_step(engine, data, args.steps, engine.device), args)
    return info


def run_anchor(args, events: StepEvents) -> dict:
    """HF Trainer + PEFT + DeepSpeed ZeRO-3, as users glue them today (Liger through TrainingArguments)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from lora_ds.model import preset_config

    with open(args.ds_config) as f:
        ds = json.load(f)
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        bf16=True,
        deepspeed=ds,
        learning_rate=2e-4,
        weight_decay=0.1,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_steps=10**6,
        report_to=[],
        remove_unused_columns=False,
        gradient_checkpointing=args.grad_ckpt,
        dataloader_num_workers=0,
        use_liger_kernel=args.stack == "anchor-liger",
    )
    model = AutoModelForCausalLM.from_config(
        preset_config(args.model[len("preset:") :]), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            # PEFT takes "all-linear" as a string only; in a list it is a module name.
            target_modules="all-linear" if args.targets == "all-linear" else args.targets.split(","),
            task_type="CAUSAL_LM",
        ),
    )
    world = int(os.environ.get("WORLD_SIZE", 1))
    n = args.micro_batch * world * args.steps
    if args.lengths:  # one example a row, padded to the longest of its batch: how users feed the Trainer
        rows = real_length_rows(args.lengths, n, model.config.vocab_size)
        dataset = [
            {"input_ids": r["input_ids"], "labels": r["labels"], "attention_mask": [1] * len(r["input_ids"])}
            for r in rows
        ]
        collator = DataCollatorForSeq2Seq(demo_tokenizer(), padding="longest", label_pad_token_id=-100)
    else:
        rows = synthetic_rows(n, args.seq, model.config.vocab_size)
        dataset = [
            {
                "input_ids": torch.tensor(r["input_ids"]),
                "labels": torch.tensor(r["labels"]),
                "attention_mask": torch.ones(args.seq, dtype=torch.long),
            }
            for r in rows
        ]
        collator = None
    # Step i reads rows [i·micro, (i+1)·micro) of this rank's share (the order does not change the speed).
    events.tokens = [
        sum(len(r["input_ids"]) for r in rows[i * args.micro_batch * world :][: args.micro_batch])
        for i in range(args.steps)
    ]

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            events.mark()

        def on_step_end(self, _args, state, *a, **kw):
            if state.global_step == args.steps:
                events.mark()

    InOrder(model=model, args=targs, train_dataset=dataset, data_collator=collator, callbacks=[StepTimer()]).train()
    return {}


class HookClock:
    """Host seconds spent in DeepSpeed's ZeRO-3 module hooks (fetch, release, prefetch) while active."""

    NAMES = (
        "pre_sub_module_forward_function",
        "post_sub_module_forward_function",
        "pre_sub_module_backward_function",
        "post_sub_module_backward_function",
    )

    def __enter__(self):
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

        self.cls, self.seconds, self.calls, self.saved = DeepSpeedZeRoOffload, 0.0, 0, {}
        for name in self.NAMES:
            original = getattr(DeepSpeedZeRoOffload, name)
            self.saved[name] = original

            def timed(offload, module, _original=original):
                start = time.perf_counter()
                try:
                    return _original(offload, module)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

            setattr(DeepSpeedZeRoOffload, name, timed)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(self.cls, name, original)


GEMM_MARKERS = ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "ampere_", "cublas")


class SyncClock:
    """The host's waits for the GPU while active (stream, event and device synchronize; a GPU tensor read on the
    host: .item(), bool(), float(), int(), .tolist()), counted by the three innermost frames that called them."""

    TENSOR_READS = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __enter__(self):
        import collections

        self.sites, self.saved = collections.Counter(), []
        for owner, name in (
            (torch.cuda.Stream, "synchronize"),
            (torch.cuda.Event, "synchronize"),
            (torch.cuda, "synchronize"),
            *((torch.Tensor, name) for name in self.TENSOR_READS),
        ):
            original = getattr(owner, name)
            self.saved.append((owner, name, original))
            reads = owner is torch.Tensor

            def counted(*args, _original=original, _reads=reads, **kwargs):
                if not _reads or args[0].is_cuda:
                    frames = traceback.extract_stack(limit=4)[:-1]
                    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[::-1])
                    self.sites[where] += 1
                return _original(*args, **kwargs)

            setattr(owner, name, counted)
        return self

    def __exit__(self, *exc):
        for owner, name, original in self.saved:
            setattr(owner, name, original)


class Phases:
    """record_function ranges named forward, backward and step around the engine's calls while active, so that
    the profile can say in which phase the GPU waited for the host."""

    NAMES = ("forward", "backward", "step")

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(self.engine, name)

            def marked(*args, _original=original, _name=name, **kwargs):
                with torch.profiler.record_function(f"phase:{_name}"):
                    return _original(*args, **kwargs)

            setattr(self.engine, name, marked)  # an instance attribute shadows the method (nn.Module calls forward)
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            delattr(self.engine, name)


def idle_gaps(prof, min_us: float = 20.0) -> dict:
    """Where the GPU had no kernel or copy running during the profiled step: the union of device intervals
    subtracted from the span of the first to the last, each gap of at least `min_us` laid to the phase (Phases)
    the host was in when it began ("(none)": outside them, e.g. the loss between forward and backward), and the
    largest gaps placed: how far into their phase, the host op at their middle and the one before them."""
    events = prof.events()
    device = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA
    )
    if not device:
        return {}
    gaps, busy_end = [], device[0][1]
    for start, end in device[1:]:
        if start - busy_end >= min_us:
            gaps.append((busy_end, start))
        busy_end = max(busy_end, end)
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    phases = [e for e in host if e.name.startswith("phase:")]

    def covering(at: float, among):
        inside = [e for e in among if e.time_range.start <= at <= e.time_range.end]
        return min(inside, key=lambda e: e.time_range.elapsed_us()) if inside else None

    def innermost(at: float, among) -> str:
        event = covering(at, among)
        return event.name if event else "(none)"

    def last_before(at: float, among) -> str:
        ended = [e for e in among if e.time_range.end <= at]
        return max(ended, key=lambda e: e.time_range.end).name if ended else "(none)"

    def placed(start: float, end: float) -> dict:
        """A gap's size and place: its phase, how far into it (ms) and how much of it was left after the gap,
        the host op at its middle and the last one that ended before it (where the host was coming from)."""
        phase = covering(start, phases)
        where = {"ms": round((end - start) / 1e3, 3), "phase": "(none)"}
        if phase is not None:
            where.update(
                phase=phase.name.removeprefix("phase:"),
                at_ms=round((start - phase.time_range.start) / 1e3, 2),
                left_ms=round((phase.time_range.end - end) / 1e3, 2),
            )
        where.update(host_op=innermost((start + end) / 2, ops)[:80], after_op=last_before(start, ops)[:80])
        return where

    by_phase: dict[str, float] = {}
    for start, end in gaps:
        phase = innermost(start, phases).removeprefix("phase:")
        by_phase[phase] = by_phase.get(phase, 0.0) + (end - start) / 1e6
    ops = [e for e in host if not e.name.startswith("phase:")]
    largest = sorted(gaps, key=lambda g: g[0] - g[1])[:8]
    return {
        "span_s": (busy_end - device[0][0]) / 1e6,
        "idle_s": sum(end - start for start, end in gaps) / 1e6,
        "gaps": len(gaps),
        "idle_s_by_phase": {k: round(v, 5) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
        "largest": [placed(start, end) for start, end in largest],
    }


def profile_step(step, args) -> dict:
    """One extra step under torch.profiler and the hook clock: the GEMM share of CUDA time, the top non-GEMM
    kernels, host time in ZeRO-3 hooks, the GPU's idle gaps by phase. The table goes to --profile (a file)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with HookClock() as hooks, SyncClock() as syncs, profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - start
    # Phases' ranges get the device time of the kernels inside them: kernels only.
    kernels = [
        e
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("phase:")
    ]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    is_gemm = [any(m in e.key.lower() for m in GEMM_MARKERS) for e in kernels]
    others = sorted((e for e, g in zip(kernels, is_gemm) if not g), key=lambda e: -e.self_device_time_total)
    with open(args.profile, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
        # The same ops by input shape: which tensors the elementwise and copy kernels move.
        f.write("\n\nBy input shape:\n")
        by_shape = prof.key_averages(group_by_input_shape=True)
        f.write(by_shape.table(sort_by="self_cuda_time_total", row_limit=40, max_shapes_column_width=120))
        # Where the host waits for the GPU (each wait can leave it idle while the host catches up).
        f.write("\n\nHost waits for the GPU (calls, where):\n")
        for where, n in syncs.sites.most_common():
            f.write(f"{n:5d}  {where}\n")
        gaps = idle_gaps(prof)
        f.write("\n\nGPU idle gaps (phase the host was in; host op at the gap's middle):\n")
        f.write(json.dumps(gaps, indent=1) + "\n")
    return {
        "step_wall_s": wall,
        "cuda_time_s": total / 1e6,
        "gemm_share": sum(e.self_device_time_total for e, g in zip(kernels, is_gemm) if g) / total,
        "top_non_gemm": [
            {"kernel": e.key[:90], "share": e.self_device_time_total / total, "calls": e.count} for e in others[:10]
        ],
        "zero3_hook_host_s": hooks.seconds,
        "zero3_hook_calls": hooks.calls,
        "host_syncs": sum(syncs.sites.values()),
        "idle": gaps,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["ours", "anchor", "anchor-liger"], required=True)
    parser.add_argument("--model", default="preset:llama-3-8b")
    parser.add_argument(
        "--ds_config", default=None, help="default: ds_configs/zero3.json (ours), bench/anchor_zero3.json (anchors)"
    )
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup_steps", type=int, default=6)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--grad_ckpt", action="store_true")
    parser.add_argument("--ours_flags", default="", help="more launcher flags for --stack ours")
    parser.add_argument(
        "--lengths",
        help="real-length rows drawn from this length distribution "
        "(bench/lengths_wikisql_samsum.json): ours packs them into rows of --seq, "
        "the anchors pad each batch to its longest row; tok/s counts real tokens",
    )
    parser.add_argument("--tag", default="")
    parser.add_argument("--profile", help="write a torch.profiler table of one extra step here (ours)")
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    args.ds_config = args.ds_config or ("ds_configs/zero3.json" if args.stack == "ours" else "bench/anchor_zero3.json")

    # Before any DeepSpeed config is live: transformers would build the meta model under zero.Init.
    fpt = flops_per_token(args.model, args.targets.split(","), args.lora_r, args.seq)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    events = StepEvents()
    start = time.perf_counter()
    info = (run_ours if args.stack == "ours" else run_anchor)(args, events)
    times = events.seconds()
    wall = time.perf_counter() - start
    import torch.distributed as dist

    from lora_ds.dist import shutdown

    cuda = torch.cuda.is_available()
    peak = torch.tensor(
        [
            torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        ],
        device="cuda" if cuda else "cpu",
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("BENCH " + json.dumps(record(args, times, events.tokens, peak.tolist(), wall, fpt, info)), flush=True)
    shutdown()


def record(
    args, times: list[float], events_tokens: list[int], peak: list[float], wall: float, fpt: float, info: dict
) -> dict:
    import torch.distributed as dist

    steady = times[args.warmup_steps :]
    median, best = statistics.median(steady), min(steady)
    tokens = args.micro_batch * args.seq
    # Useful (non-padding) tokens per second of each steady step; all tokens are useful at full length.
    rates = [n / t for n, t in zip(events_tokens[args.warmup_steps :], steady)] if args.lengths else None
    return {
        "kind": "run",
        "stack": args.stack,
        "tag": args.tag or args.stack,
        "model": args.model,
        "gpus": dist.get_world_size(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "lora_r": args.lora_r,
        "targets": args.targets,
        "grad_ckpt": args.grad_ckpt,
        "ds_config": args.ds_config,
        "ours_flags": args.ours_flags,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "step_s": [round(t, 4) for t in times],
        "median_step_s": median,
        "best_step_s": best,
        "lengths": args.lengths,
        "tok_s_per_gpu": statistics.median(rates) if rates else tokens / median,
        "best_tok_s_per_gpu": max(rates) if rates else tokens / best,
        "flops_per_token": fpt,
        # At full length only: real-length rows have other attention costs and padding.
        "mfu_vs_790": None if rates else fpt * tokens / median / 790e12,
        "peak_alloc_gib": peak[0],
        "peak_reserved_gib": peak[1],
        "process_wall_s": wall,
        "date": time.strftime("%Y-%m-%d"),
        **info,
    }


if __name__ == "__main__":
    main()
