"""The training step and loop: forward, backward, step, log, eval, checkpoint cadence, stop signals."""
from __future__ import annotations

import json
import os
import resource
import signal
import time
from dataclasses import dataclass, field

import torch

from lora_ds.data import IGNORE_INDEX, collate, eval_shards
from lora_ds.fsutil import write_text
from lora_ds.loss import lm_loss


def peak_memory_gib() -> float:
    """Peak accelerator memory if there is one, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StopSignal:
    """Remembers SIGUSR1/SIGTERM (preemption notice); ranks agree on it at step boundaries."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


STOPPED_FILE_ENV = "LORA_DS_STOPPED_FILE"


def report_stopped(tag: str) -> None:
    """Tell the job script that the run stopped after the complete checkpoint `tag` and should be requeued:
    write `tag` to the file its LORA_DS_STOPPED_FILE names. Rank 0 calls it before the final barrier, so it exists
    before any rank exits. The exit status 124 alone is not enough under `srun --kill-on-bad-exit`: the first
    rank to exit 124 makes srun kill the others, and srun then reports their signal instead."""
    path = os.environ.get(STOPPED_FILE_ENV)
    if path:
        write_text(path, tag + "\n")


def drop_metrics_after(path: str, step: int) -> None:
    """Remove metrics.jsonl records past `step` (and a line cut short): a run that died after its last
    checkpoint logged steps that the resumed run does again."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def before(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line)["step"] <= step
        except json.JSONDecodeError:
            return False

    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


@dataclass
class Loop:
    """Everything the loop needs; built by the launcher."""

    engine: object
    rows: object
    eval_rows: object
    sampler: object
    pad_id: int
    total_steps: int
    output_dir: str
    log_every: int
    eval_every: int
    save_every: int
    halt_at_step: int
    save_fn: object  # save_fn(step) -> tag
    max_skipped_steps: int = 10
    mask_dtype: torch.dtype = torch.float32
    task_eval: object = None  # task_eval(model, step) -> metrics: generation eval (collective), at eval steps
    rank: int = 0
    world: int = 1
    device: object = None
    stop: StopSignal = field(default_factory=StopSignal)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, step: int) -> tuple[torch.Tensor, int]:
        """One optimizer step over this rank's micro-batches: (sum of micro-batch losses, tokens read)."""
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for indices in self.sampler.micro_batches(step, self.rank):
            rows = [self.rows[i] for i in indices]
            tokens += sum(len(r["input_ids"]) for r in rows)
            loss, _ = lm_loss(self.engine, self._to_device(collate(rows, self.pad_id, self.mask_dtype)))
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach()
        return loss_sum, tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted eval loss over the held-out rows, every rank in lockstep."""
        import torch.distributed as dist

        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        micro = self.sampler.micro
        for indices in eval_shards(len(self.eval_rows), micro, self.world, self.rank):
            rows = []
            for i in indices:
                row = dict(self.eval_rows[max(i, 0)])
                if i < 0:  # padding so this rank keeps step with the others: counts for nothing
                    row["labels"] = [IGNORE_INDEX] * len(row["labels"])
                rows.append(row)
            batch = self._to_device(collate(rows, self.pad_id, self.mask_dtype))
            loss, n = lm_loss(self.engine, batch)
            # A batch of padding only has a NaN mean loss and weight 0.
            totals += torch.stack([torch.nan_to_num(loss.double()) * n, n.double()])
        dist.all_reduce(totals)
        self.engine.train()
        return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")

    def run(self, start_step: int) -> str:
        """Train from `start_step` to the end; returns why it stopped: 'done', 'halt', 'nonfinite' or the
        signal name.

        A step whose gradients hold NaN/Inf is skipped by DeepSpeed (no update, counted in
        engine.skipped_steps); past `max_skipped_steps` the run stops without saving, so the last
        checkpoint is the last good state.
        """
        import torch.distributed as dist
        from tqdm import tqdm

        self.engine.train()
        bar = tqdm(total=self.total_steps, initial=start_step, desc="train", disable=self.rank != 0,
                   dynamic_ncols=True)
        metrics = None
        if self.rank == 0:
            drop_metrics_after(os.path.join(self.output_dir, "metrics.jsonl"), start_step)
            metrics = open(os.path.join(self.output_dir, "metrics.jsonl"), "a")
        window = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, micro-batches, tokens
        window_start, outcome = time.perf_counter(), "done"
        try:
            for step in range(start_step, self.total_steps):
                loss_sum, tokens = self.train_step(step)
                if self.engine.skipped_steps > self.max_skipped_steps:
                    outcome = "nonfinite"
                    break
                window += torch.stack([loss_sum.double(), torch.tensor(float(self.sampler.accum),
                                                                        device=self.device, dtype=torch.float64),
                                       torch.tensor(float(tokens), device=self.device, dtype=torch.float64)])
                done = step + 1
                if done % self.log_every == 0 or done == self.total_steps:
                    dist.all_reduce(window)
                    elapsed = time.perf_counter() - window_start
                    record = {"step": done, "loss": (window[0] / window[1]).item(),
                              "lr": self.engine.get_lr()[0], "tokens": int(window[2].item()),
                              "tokens_per_s": window[2].item() / elapsed, "peak_mem_gib": peak_memory_gib(),
                              "skipped_steps": self.engine.skipped_steps}
                    window.zero_()
                    window_start = time.perf_counter()
                    eval_step = (self.eval_every and done % self.eval_every == 0) or done == self.total_steps
                    if self.eval_rows is not None and eval_step:
                        record["eval_loss"] = self.evaluate()
                        window_start = time.perf_counter()
                    if self.task_eval is not None and eval_step:
                        self.engine.eval()
                        record.update(self.task_eval(self.engine.module, done))
                        self.engine.train()
                        window_start = time.perf_counter()
                    if metrics:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                halt = self.halt_at_step and done == self.halt_at_step
                stopping = halt or self.stop.agreed(self.device)
                if stopping or done == self.total_steps or (self.save_every and done % self.save_every == 0):
                    self.save_fn(done)
                    window_start = time.perf_counter()
                if stopping:
                    outcome = "halt" if halt else self.stop.received or "signal"
                    break
        finally:
            bar.close()
            if metrics:
                metrics.close()
        return outcome
