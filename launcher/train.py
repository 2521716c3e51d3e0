"""LoRA fine-tuning on DeepSpeed ZeRO-3: setup (config, ranks, data, model, engine) -> train -> save -> cleanup.

    deepspeed launcher/train.py --ds_config ds_configs/zero3.json          # the demo, on every local GPU
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launcher/train.py            # the demo on 2 CPU ranks (gloo)
    deepspeed --num_gpus 8 launcher/train.py --model /models/llama-7b --data prepared/wikisql \\
        --output_dir runs/wikisql --lora_r 8 --max_steps 2000                # a real model, one node
    deepspeed --hostfile hosts launcher/train.py ...                       # several nodes over ssh
    sbatch slurm/gpt_neox.sh                                               # Slurm (srun, no ssh)
    mpirun -np 16 python launcher/train.py ...                             # MPI (ranks via mpi4py)

With no arguments it trains the embedded demo: a tiny GPT-NeoX (random weights) on launcher/demo/
into runs/demo/ (`make demo`, launcher/tour.py, takes it from there to a merged, evaluated model).
`--help` lists every flag; `--config FILE` (YAML/JSON) sets the same fields.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from lora_ds import checkpoint, kernels
from lora_ds.adapter import peft_config, to_original_base, with_tied, write_adapter
from lora_ds.build import build
from lora_ds.checkpoint_files import LORA_INIT
from lora_ds.config import DEMO_DIR, FieldError, RunConfig, as_flag_error, parse_config, resolve_ds_config
from lora_ds.data import EvalBatches, StepSampler, TrainBatches, load_rows
from lora_ds.dist import init_distributed, shutdown
from lora_ds.errors import UserError
from lora_ds.fsutil import write_json
from lora_ds.model import DTYPES, check_model_dir, preset_config
from lora_ds.quantize import matrix_numel, require_bitsandbytes
from lora_ds.tokenizer import load_tokenizer, tokenizer_record
from lora_ds.tracking import Trackers, check_installed
from lora_ds.train_loop import Checkpointer, Evaluator, Loop, MetricsLog, Outcome, StopSignal, report_stopped
from lora_ds.vocab import extend_tokenizer
from lora_ds.zero import full_numel


class Recipe:
    """One training run, as torchtune's recipes: setup(), train(), save(outcome), cleanup()."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        # Before the (long) start-up: a preemption notice that arrives now is remembered, not fatal.
        self.stop = StopSignal()
        self.ckpt_root = os.path.join(cfg.train.output_dir, "checkpoints")

    def setup(self) -> None:
        self._check_inputs()
        self.env = init_distributed()
        cfg, world = self.cfg, self.env.world_size
        self.ds_config = resolve_ds_config(cfg, world)
        torch.manual_seed(cfg.train.seed)
        self.sampler = StepSampler(len(self.rows), cfg.train.micro_batch, cfg.train.grad_accum, world, cfg.train.seed)
        self.total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * self.sampler.steps_per_epoch))
        self.trainable, self.engine = build(
            cfg,
            self.ds_config,
            self.total_steps,
            vocab_size=self.tok.vocab_size,
            packed=getattr(self.rows, "packed", False),
            first_new_id=self.first_new_id,
        )
        self._write_run_record()
        self.start_step = 0
        if self.tag is not None:
            self.start_step = checkpoint.load(self.engine, self.ckpt_root, self.tag)["step"]
            if self.env.rank == 0:
                print(f"resumed from {os.path.join(self.ckpt_root, self.tag)} at step {self.start_step}", flush=True)
        self.loop = self._setup_loop()

    def _check_inputs(self) -> None:
        """Model, tokenizer, data and resume tag, checked before the process group starts: bad input fails
        fast and alike on every rank."""
        cfg = self.cfg
        is_preset = cfg.model.name.startswith("preset:")
        if is_preset:
            preset_config(cfg.model.name[len("preset:") :])
        else:
            check_model_dir(cfg.model.name)
        tokenizer_dir = cfg.model.tokenizer or (os.path.join(DEMO_DIR, "tokenizer") if is_preset else cfg.model.name)
        # --add_tokens: the tokenizer with the new tokens, its files (saved with checkpoints and the adapter).
        self.tokenizer_files, self.first_new_id = {}, None
        if cfg.model.add_tokens:
            self.tok, self.tokenizer_files, self.first_new_id = extend_tokenizer(tokenizer_dir, cfg.model.add_tokens)
        else:
            self.tok = load_tokenizer(tokenizer_dir)
        self.rows = load_rows(cfg.data.path, self.tok, cfg.data.max_len)
        self.eval_rows = load_rows(cfg.data.eval_path, self.tok, cfg.data.max_len) if cfg.data.eval_path else None
        self.tag = checkpoint.resolve_tag(self.ckpt_root, cfg.train.resume)
        if self.tag is not None:
            checkpoint.check_resumable(os.path.join(self.ckpt_root, self.tag), cfg.to_dict(), RunConfig().to_dict())
        kernels.use_liger(cfg.model.kernels)  # --kernels liger where Liger cannot run is refused here
        check_installed(cfg.train.report_to)
        if cfg.model.quantize:
            require_bitsandbytes()

    def _write_run_record(self) -> None:
        cfg, model, lora = self.cfg, self.trainable.model, self.trainable.lora
        self.trainable_params = sum(full_numel(p) for p in lora.values())
        self.run_record = {
            **cfg.to_dict(),
            "resolved": {
                "world_size": self.env.world_size,
                "rank_source": self.env.source,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.sampler.steps_per_epoch,
                "lora_targets": self.trainable.targets,
                "adapted_modules": self.trainable.adapted,
                "saved_modules": self.trainable.saved,
                "tied_weights": self.trainable.tied,
                "vocab_size": model.get_input_embeddings().num_embeddings,
                "fused_kernels": self.trainable.fused,
                "attn_implementation": self.trainable.attention,
                "trainable_params": self.trainable_params,
                "total_params": sum(matrix_numel(p) for p in model.parameters()),
                "tokenizer": tokenizer_record(self.tok),
                "ds_config": self.ds_config,
                "versions": {
                    "torch": torch.__version__,
                    "deepspeed": __import__("deepspeed").__version__,
                    "transformers": __import__("transformers").__version__,
                },
            },
        }
        self.adapter_config = peft_config(
            r=cfg.lora.r,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=self.trainable.targets,
            use_rslora=cfg.lora.rslora,
            rank_pattern=cfg.lora.rank_pattern,
            alpha_pattern=cfg.lora.alpha_pattern,
            use_dora=cfg.lora.use_dora,
            modules_to_save=self.trainable.modules_to_save,
            ensure_weight_tying=bool(self.trainable.tied),
            init_lora_weights=cfg.lora.init_lora_weights,
            base_model=cfg.model.name,
            fan_in_fan_out=any(getattr(m, "fan_in_fan_out", False) for m in model.modules()),
        )
        if self.env.rank == 0:
            os.makedirs(cfg.train.output_dir, exist_ok=True)
            write_json(os.path.join(cfg.train.output_dir, "run_config.json"), self.run_record)

    def _setup_loop(self) -> Loop:
        cfg, engine, rank, world = self.cfg, self.engine, self.env.rank, self.env.world_size
        out, mask_dtype = cfg.train.output_dir, DTYPES[cfg.model.dtype]
        task_eval = None
        if cfg.data.eval_task:
            from lora_ds.evaluation import TaskEval

            task_eval = TaskEval(
                cfg.data.eval_task,
                cfg.data.eval_task_samples,
                cfg.train.seed,
                self.tok,
                max_len=cfg.data.max_len,
                batch_size=cfg.train.micro_batch,
                output_dir=out,
                rank=rank,
                world=world,
                device=engine.device,
            )
        by_positions = self.trainable.mask_from_positions
        eval_batches = (
            None
            if self.eval_rows is None
            else EvalBatches(
                self.eval_rows, cfg.train.micro_batch, rank, world, self.tok.pad_token_id, mask_dtype, by_positions
            )
        )
        per_step = self.sampler.per_step

        def state(step: int) -> dict:
            return {"step": step, "samples": step * per_step, "world_size": world, "time": time.time()}

        return Loop(
            engine=engine,
            data=TrainBatches(self.rows, self.sampler, rank, self.tok.pad_token_id, mask_dtype, by_positions),
            metrics=MetricsLog(
                os.path.join(out, "metrics.jsonl"),
                cfg.train.log_every,
                engine,
                rank,
                Trackers(cfg.train.report_to, out, self.run_record),
            ),
            evaluator=Evaluator(engine, cfg.train.eval_every, eval_batches, task_eval, engine.device),
            checkpointer=Checkpointer(
                engine,
                self.ckpt_root,
                cfg.train.save_every,
                cfg.train.keep_checkpoints,
                state,
                {
                    "adapter_config.json": self.adapter_config,
                    "run_config.json": self.run_record,
                    **self.tokenizer_files,
                },
                {LORA_INIT: self.trainable.lora_init} if self.trainable.lora_init else {},
            ),
            stop=self.stop,
            total_steps=self.total_steps,
            halt_at_step=cfg.train.halt_at_step,
            max_skipped_steps=cfg.train.max_skipped_steps,
            device=engine.device,
        )

    def train(self) -> Outcome:
        return self.loop.run(self.start_step)

    def save(self, outcome: Outcome) -> int:
        """The adapter when the run is done, else a report of how it stopped. Returns the exit status."""
        rank = self.env.rank
        if outcome is Outcome.NONFINITE:
            last = checkpoint.resolve_tag(self.ckpt_root, "auto")
            if rank == 0:
                print(
                    f"train: error: more than {self.cfg.train.max_skipped_steps} steps had NaN/Inf gradients "
                    f"(--max_skipped_steps); stopped without saving. The last good checkpoint is "
                    f"{os.path.join(self.ckpt_root, last) if last else 'none (no checkpoint was saved)'}; "
                    f"check the data and --lr before resuming",
                    file=sys.stderr,
                    flush=True,
                )
        elif outcome is not Outcome.DONE:
            if rank == 0:
                why = "halt" if outcome is Outcome.HALTED else self.stop.received or "signal"
                print(
                    f"stopped after a checkpoint ({why}); rerun the same command to resume "
                    "(the Slurm scripts requeue the job, which does so by itself)",
                    flush=True,
                )
                if outcome is Outcome.PREEMPTED:
                    report_stopped(checkpoint.resolve_tag(self.ckpt_root, "auto"))
        else:
            self._write_adapter()
        return outcome.exit_status

    def _write_adapter(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        # The fp32 master copies, gathered from the optimizer's partitions (collective).
        tensors = {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in self.trainable.lora.items()}
        if self.env.rank == 0:
            path = os.path.join(self.cfg.train.output_dir, "adapter")
            config = self.adapter_config
            if self.trainable.lora_init:  # PiSSA/OLoRA: as a LoRA of the original base, as export-adapter writes it
                tensors, config = to_original_base(tensors, config, self.trainable.lora_init)
            extra = {"run_config.json": self.run_record, **self.tokenizer_files}
            write_adapter(path, with_tied(tensors, self.trainable.tied), config, extra_json=extra)
            print(
                f"adapter written to {path} ({self.trainable_params:,} trainable of "
                f"{self.run_record['resolved']['total_params']:,} params)",
                flush=True,
            )

    def cleanup(self) -> None:
        """Every rank together, on a normal end only: a rank's error never waits in a barrier."""
        del self.trainable, self.engine
        shutdown()


def main(argv: list[str] | None = None) -> int:
    """Train; the exit status says how it ended."""
    recipe = Recipe(parse_config(argv))
    recipe.setup()
    code = recipe.save(recipe.train())
    recipe.cleanup()
    return code


def cli(argv: list[str] | None = None) -> int:
    """main() with bad input reported as one line on stderr and exit status 2."""
    try:
        return main(argv)
    except FieldError as e:  # a field checked after parsing (e.g. LoRA targets against the model): name the flag
        print(f"train: error: {as_flag_error(e)}", file=sys.stderr, flush=True)
        return 2
    except UserError as e:
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
