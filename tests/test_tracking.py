"""--report_to tensorboard: the event files hold metrics.jsonl's records, and a resumed run's writer replaces the
steps past its checkpoint as metrics.jsonl does (read back with TensorBoard's own reader). --report_to wandb: an
offline run holds them too, and a resumed run continues it (read back from W&B's own record files)."""

from __future__ import annotations

import json
import time

from helpers import as_tensorboard, read_metrics, tensorboard_scalars, wandb_runs

from lora_ds.tracking import Trackers
from lora_ds.train_loop import drop_metrics_after


def record(step: int, seed: float) -> dict:
    """A record as MetricsLog writes it; eval steps (every 2nd) carry eval loss and a task's metrics."""
    r = {
        "step": step,
        "loss": seed - 0.1 * step,
        "grad_norm": 1.5 + seed / step,
        "lr": 1e-3 / step,
        "peak_mem_gib": 0.25,
        "skipped_steps": 0,
        "tokens": 1000 + step,
        "tokens_per_s": 123.456 * step,
    }
    if step % 2 == 0:
        r.update(eval_loss=seed - 0.05 * step, eval_wikisql_n=3, eval_wikisql_lf_accuracy=100 / 3)
    return r


def run(out, start_step: int, steps: range, seed: float, finish: bool = True, names=("tensorboard",)) -> None:
    """What the trainer's rank 0 does from `start_step`: metrics.jsonl (dropping the records past it) and the
    tracker, fed the same records; `finish=False` dies after the last record, before closing either."""
    drop_metrics_after(str(out / "metrics.jsonl"), start_step)
    trackers = Trackers(list(names), str(out), {"lora": {"r": 16}})
    trackers.open(start_step)
    with open(out / "metrics.jsonl", "a") as f:
        for step in steps:
            f.write(json.dumps(record(step, seed)) + "\n")
            trackers.log(record(step, seed))
    if finish:
        trackers.close()
    else:
        trackers.flush()  # what the loop does before each checkpoint: this run's events reached the disk


def test_event_files_hold_the_records_and_a_resume_replaces_the_steps_past_its_checkpoint(tmp_path):
    # Died after logging step 4, its checkpoint step 3: without a purge, step 4 would be there twice.
    run(tmp_path, 0, range(1, 5), seed=5.0, finish=False)
    run(tmp_path, 3, range(4, 8), seed=9.0)
    expected = [record(s, 5.0) for s in (1, 2, 3)] + [record(s, 9.0) for s in (4, 5, 6, 7)]
    assert read_metrics(tmp_path) == expected
    scalars = tensorboard_scalars(tmp_path)
    assert scalars == as_tensorboard(expected)
    assert sorted(scalars) == [
        "eval/loss",
        "eval/wikisql_lf_accuracy",
        "eval/wikisql_n",
        "train/grad_norm",
        "train/loss",
        "train/lr",
        "train/peak_mem_gib",
        "train/skipped_steps",
        "train/tokens",
        "train/tokens_per_s",
    ]
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4, 6]
    assert scalars["train/loss"][4] == (5, 9.0 - 0.5)  # float32 of 8.5: the resumed run's value

    # A run started over (--resume never: step 0) hides every earlier event, as metrics.jsonl drops every record.
    run(tmp_path, 0, range(1, 3), seed=2.0)
    assert tensorboard_scalars(tmp_path) == as_tensorboard([record(1, 2.0), record(2, 2.0)])


def tags(r: dict) -> dict:
    """A record's values by W&B tag (Hugging Face Trainer's: eval/X for eval_X, train/X for the others)."""
    return {
        ("eval/" + k[len("eval_") :] if k.startswith("eval_") else "train/" + k): v for k, v in r.items() if k != "step"
    }


def test_a_wandb_offline_run_holds_the_records_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline: lora-ds's default
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, 0, range(1, 5), seed=5.0, names=["wandb"])
    time.sleep(1.0)  # W&B names a run's dir by its start second: the resumed run's must be another
    run(tmp_path, 3, range(4, 6), seed=9.0, names=["wandb"])
    first, resumed = wandb_runs(tmp_path, 2)
    assert first["id"] == resumed["id"] == (tmp_path / "wandb" / "run_id").read_text().strip()
    assert first["config"] == {"lora": {"r": 16}}
    assert first["history"] == [(s, tags(record(s, 5.0))) for s in range(1, 5)]
    # The resumed run logs step 4 again; W&B's server keeps the first value of a step it already has.
    assert resumed["history"] == [(s, tags(record(s, 9.0))) for s in (4, 5)]
    # A run from step 0 (--resume never) is a new W&B run.
    run(tmp_path, 0, range(1, 2), seed=2.0, names=["wandb"])
    assert len({r["id"] for r in wandb_runs(tmp_path, 3)}) == 2
