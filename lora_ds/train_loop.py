"""The training loop and the components that decide their own cadence: metrics, evaluation, checkpoints, stops.

The loop asks each component whether it is due (torchtitan's checkpointer owns its interval); it counts
nothing itself. No step waits for the device: losses, gradient norms and stop votes are reduced asynchronously
and read one step later, by which time DeepSpeed's own check of the gradient norm in the optimizer step has
synchronised. The trackers (lora_ds/tracking.py) get metrics.jsonl's records once they are on the host.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lora_ds import checkpoint
from lora_ds.data import EvalBatches, TrainBatches
from lora_ds.fsutil import write_text
from lora_ds.loss import lm_loss
from lora_ds.tracking import Trackers


class Outcome(enum.Enum):
    """How a run ended, and the exit status that tells a job script what to do next."""

    DONE = (0, "done")
    HALTED = (0, "halted at --halt_at_step")
    PREEMPTED = (124, "stopped by a signal after a checkpoint")
    NONFINITE = (3, "too many steps with NaN/Inf gradients")

    def __init__(self, exit_status: int, meaning: str):
        self.exit_status, self.meaning = exit_status, meaning


def peak_memory_gib() -> float:
    """Peak accelerator memory if there is one, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Later:
    """A small device tensor, all-reduced across ranks and copied to the host without blocking the step;
    `value()` waits for that copy alone, not for the work queued after it."""

    def __init__(self, tensor: torch.Tensor, op=None):
        import torch.distributed as dist

        # NCCL: wait() only orders the current stream after the reduction; gloo: it returns when done.
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, async_op=True).wait()
        self._event = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def value(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host


class StopSignal:
    """Remembers SIGUSR1/SIGTERM (preemption notice); ranks agree on it at step boundaries."""

    def __init__(self):
        self.received = None
        self._vote: Later | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """Whether some rank had a signal at the previous call; casts this call's vote. A signal is acted on one
        step after it arrives, identically on every rank, and no step waits for the vote."""
        import torch.distributed as dist

        previous = self._vote
        self._vote = Later(torch.full((1,), float(self.received is not None), device=device), dist.ReduceOp.MAX)
        return previous is not None and bool(previous.value().item())


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
class MetricsLog:
    """metrics.jsonl (rank 0): a record every `every` steps, at eval steps and at the last step. A record's
    device values are reduced when it is due and written at the next call: the step never waits for them.
    `trackers` (--report_to) get each record as it is written."""

    path: str
    every: int
    engine: object
    rank: int = 0
    trackers: Trackers | None = None
    _loss: torch.Tensor | None = None
    _micro: int = 0
    _tokens: int = 0
    _start: float = 0.0
    _excluded: float = 0.0
    _pending: tuple | None = None
    _file: object = None
    _bar: object = None

    def open(self, start_step: int, total_steps: int) -> None:
        from tqdm import tqdm

        self._start = time.perf_counter()
        if self.rank == 0:
            drop_metrics_after(self.path, start_step)
            self._file = open(self.path, "a")
            if self.trackers is not None:
                self.trackers.open(start_step)
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc="train", disable=self.rank != 0, dynamic_ncols=True
        )

    def add(self, loss_sum: torch.Tensor, micro_batches: int, tokens: int) -> None:
        self._loss = loss_sum.double() if self._loss is None else self._loss + loss_sum.double()
        self._micro += micro_batches
        self._tokens += tokens
        self._bar.update(1)

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def log(self, step: int, extra: dict) -> None:
        """Reduce this window's values (asynchronously) and write the previous record."""
        self._write_pending()
        device = self._loss.device
        values = [
            self._loss,
            torch.full((), float(self._micro), dtype=torch.float64, device=device),
            torch.full((), float(self._tokens), dtype=torch.float64, device=device),
        ]
        norm = self._grad_norm(device)
        window = torch.stack(values if norm is None else [*values, norm])
        lrs = self.engine.get_lr()
        record = {
            "step": step,
            "lr": lrs[0],
            **({"lr_B": lrs[1]} if len(lrs) > 1 else {}),  # LoRA+: the lora_B group's
            "peak_mem_gib": peak_memory_gib(),
            "skipped_steps": self.engine.skipped_steps,
            **extra,
        }
        self._pending = (record, Later(window), time.perf_counter() - self._start - self._excluded)
        self._loss, self._micro, self._tokens = None, 0, 0
        self._start, self._excluded = time.perf_counter(), 0.0

    def _grad_norm(self, device) -> torch.Tensor | None:
        """The last step's global gradient L2 norm before clipping, as DeepSpeed's optimizer step left it (a device
        tensor, inf for a skipped step, None where that optimizer computes none). It is the same on every rank:
        rank 0's share of the window's sum is the norm and every other rank's is 0, so the sum is exact."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        if self.rank != 0:
            return torch.zeros((), dtype=torch.float64, device=device)
        if torch.is_tensor(norm):
            return norm.detach().to(device=device, dtype=torch.float64).reshape(())
        return torch.full((), float(norm), dtype=torch.float64, device=device)

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        record, window, elapsed = self._pending
        self._pending = None
        loss, micro, tokens, *norm = window.value().tolist()
        record = {
            "step": record["step"],
            "loss": loss / micro,
            **({"grad_norm": norm[0]} if norm else {}),
            **record,
            "tokens": int(tokens),
            "tokens_per_s": tokens / elapsed,
        }
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self.trackers is not None:
                self.trackers.log(record)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def flush(self) -> None:
        """Write the pending record, if any, and have the trackers put what they hold on disk."""
        self._write_pending()
        if self.trackers is not None:
            self.trackers.flush()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, saving) does not count against throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - start

    def close(self) -> None:
        self._write_pending()
        if self._bar is not None:
            self._bar.close()
        if self._file:
            self._file.close()
        if self.trackers is not None:
            self.trackers.close()


@dataclass
class Evaluator:
    """Eval loss on held-out rows and generation eval of a task, every `every` steps (0: only at the end)."""

    engine: object
    every: int
    batches: EvalBatches | None = None
    task_eval: Callable | None = None  # task_eval(model, step) -> metrics (collective)
    device: object = None

    def due(self, step: int, last: bool) -> bool:
        wanted = self.batches is not None or self.task_eval is not None
        return wanted and (last or (self.every > 0 and step % self.every == 0))

    def run(self, step: int) -> dict:
        self.engine.eval()
        try:
            record = {"eval_loss": self.loss()} if self.batches is not None else {}
            if self.task_eval is not None:
                record.update(self.task_eval(self.engine.module, step))
        finally:
            self.engine.train()
        return record

    @torch.no_grad()
    def loss(self) -> float:
        """Token-weighted eval loss over the held-out rows, every rank in lockstep."""
        import torch.distributed as dist

        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.batches:
            loss, n = lm_loss(self.engine, {k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            # A batch of padding only has a NaN mean loss and weight 0.
            totals += torch.stack([torch.nan_to_num(loss.double()) * n, n.double()])
        dist.all_reduce(totals)
        return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


@dataclass
class Checkpointer:
    """Saves through lora_ds.checkpoint every `every` steps (0: only at the end), at the last step and when the
    run stops early; keeps the newest `keep` tags."""

    engine: object
    root: str
    every: int
    keep: int
    state: Callable[[int], dict]  # trainer_state.json of a step
    extra_json: dict = field(default_factory=dict)  # files written into every tag
    extra_tensors: dict = field(default_factory=dict)  # safetensors files written into every tag

    def due(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)

    def save(self, step: int) -> str:
        return checkpoint.save(
            self.engine, self.root, step, self.state(step), self.extra_json, self.keep, self.extra_tensors
        )


def train_step(engine, data: TrainBatches, step: int, device) -> tuple[torch.Tensor, int]:
    """One optimizer step over this rank's micro-batches: (sum of micro-batch losses, tokens read)."""
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for batch, n_tokens in data.step(step):
        loss, _ = lm_loss(engine, {k: v.to(device, non_blocking=True) for k, v in batch.items()})
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
        tokens += n_tokens
    return loss_sum, tokens


@dataclass
class Loop:
    """Steps from a start step to `total_steps`, asking its components when to log, evaluate and save."""

    engine: object
    data: TrainBatches
    metrics: MetricsLog
    evaluator: Evaluator
    checkpointer: Checkpointer
    stop: StopSignal
    total_steps: int
    halt_at_step: int = 0
    max_skipped_steps: int = 10
    device: object = None

    def run(self, start_step: int) -> Outcome:
        """Train from `start_step` to the end, or until a halt, a stop signal or too many non-finite steps.

        A step whose gradients hold NaN/Inf is skipped by DeepSpeed (no update, counted in
        engine.skipped_steps); past `max_skipped_steps` the run stops without saving, so the last
        checkpoint is the last good state.
        """
        self.engine.train()
        self.metrics.open(start_step, self.total_steps)
        try:
            for step in range(start_step, self.total_steps):
                loss_sum, tokens = train_step(self.engine, self.data, step, self.device)
                if self.engine.skipped_steps > self.max_skipped_steps:
                    return Outcome.NONFINITE
                done, last = step + 1, step + 1 == self.total_steps
                self.metrics.add(loss_sum, self.data.accum, tokens)
                outcome = self._stopping(done)
                self._log_and_evaluate(done, last)
                if outcome is not None or self.checkpointer.due(done, last):
                    self.metrics.flush()  # every record up to a checkpoint is on disk before it is sealed
                    with self.metrics.paused():
                        self.checkpointer.save(done)
                if outcome is not None:
                    return outcome
            return Outcome.DONE
        finally:
            self.metrics.close()

    def _stopping(self, done: int) -> Outcome | None:
        if self.halt_at_step and done == self.halt_at_step:
            return Outcome.HALTED
        return Outcome.PREEMPTED if self.stop.agreed(self.device) else None

    def _log_and_evaluate(self, done: int, last: bool) -> None:
        extra = {}
        if self.evaluator.due(done, last):
            with self.metrics.paused():
                extra = self.evaluator.run(done)
        if extra or self.metrics.due(done, last):
            self.metrics.log(done, extra)
