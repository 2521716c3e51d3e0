"""Trackers (--report_to): the records of metrics.jsonl, also as TensorBoard event files and a W&B run.

    Trackers(["tensorboard"], output_dir, run_record)   MetricsLog opens it on rank 0, feeds it each record it
                                                         writes to metrics.jsonl, flushes it before a checkpoint
                                                         and closes it when the loop ends (preemption included)

A record reaches the trackers once its values are on the host, so a tracker never makes a step wait for the
device. Tags are Hugging Face Trainer's: `eval_X` is `eval/X`, every other value `train/X`, at the record's step.
A resumed run starts from its checkpoint's step as metrics.jsonl does: TensorBoard hides the events past it
(SummaryWriter's purge_step); W&B continues the same run (its id is kept in OUTPUT/wandb/run_id).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from dataclasses import dataclass, field

from lora_ds.errors import UserError
from lora_ds.fsutil import write_text

# --report_to's names: the package each needs.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(names: list[str]) -> None:
    """Refuse a tracker whose package is missing, before the ranks start."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(
                f"--report_to {name}: the {PACKAGES[name]} package is not installed; "
                f"pip install {PACKAGES[name]}, or leave {name} out of --report_to"
            )


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record by tag (its step is the x-axis, not a scalar)."""
    return {
        ("eval/" + key[len("eval_") :] if key.startswith("eval_") else "train/" + key): value
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoard:
    """Event files under OUTPUT/tensorboard/."""

    def __init__(self, output_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the events of steps >= purge_step written before: those of a run that died after
        # the checkpoint this one resumes from (metrics.jsonl drops them).
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run in OUTPUT/wandb/, offline unless WANDB_MODE says otherwise (`wandb sync` uploads
    it); WANDB_PROJECT (default lora-ds) and WANDB_RUN_ID are honoured. W&B never rewinds a run: the steps that
    a resumed run logs again keep their first values there."""

    def __init__(self, output_dir: str, start_step: int, config: dict):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lora-ds"),
            name=os.path.basename(os.path.abspath(output_dir)),
            id=os.environ.get("WANDB_RUN_ID") or run_id(output_dir, start_step),
            resume="allow",
            dir=output_dir,
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def flush(self) -> None:
        pass  # wandb's own service process writes as it goes

    def close(self) -> None:
        self.run.finish()


def run_id(output_dir: str, start_step: int) -> str:
    """The W&B run of this output dir: the one a resumed run continues, a new one for a run from step 0."""
    path = os.path.join(output_dir, "wandb", "run_id")
    if start_step > 0 and os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = uuid.uuid4().hex[:8]
    write_text(path, new + "\n")
    return new


@dataclass
class Trackers:
    """The trackers --report_to names (none: this does nothing)."""

    names: list[str]
    output_dir: str
    config: dict = field(default_factory=dict)  # the run record, shown as the W&B run's config
    _open: list = field(default_factory=list)

    def open(self, start_step: int) -> None:
        kinds = {
            "tensorboard": lambda: TensorBoard(self.output_dir, start_step),
            "wandb": lambda: Wandb(self.output_dir, start_step, self.config),
        }
        self._open = [kinds[name]() for name in self.names]

    def log(self, record: dict) -> None:
        for tracker in self._open:
            tracker.log(record)

    def flush(self) -> None:
        for tracker in self._open:
            tracker.flush()

    def close(self) -> None:
        for tracker in self._open:
            tracker.close()
        self._open = []
