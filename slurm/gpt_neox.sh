#!/bin/bash
# LoRA on GPT-NeoX-20B (ZeRO-3) across N nodes of 8 GPUs: one process per GPU, started by srun (no ssh).
#
#   sbatch slurm/gpt_neox.sh                         # from the repository root: 4 nodes x 8 GPUs
#   sbatch --nodes=8 slurm/gpt_neox.sh               # sbatch flags override the #SBATCH lines below
#   MODEL=/models/gpt-neox-20b OUTPUT=runs/neox-sql sbatch slurm/gpt_neox.sh
#
# Settings: environment variables of the sbatch command (exported into the job); defaults in brackets.
#   MODEL       Hugging Face model dir                           [models/gpt-neox-20b]
#   DATA        prepared dir (lora-ds prep) or prompt/completion JSONL   [prepared/wikisql]
#   EVAL_DATA   held-out split, "" for none                      [prepared/wikisql-dev]
#   OUTPUT      run dir: checkpoints/, metrics.jsonl, adapter/   [runs/gpt-neox-20b-lora]
#   DS_CONFIG   DeepSpeed config                                 [ds_configs/zero3.json]
#   TRAIN_ARGS  more launcher/train.py flags (--config FILE too) [--lora_r 8 ... below]
#   PYTHON      interpreter with lora-ds installed               [python]
# Without GPUs (as the tests run it): DS_ACCELERATOR=cpu, and sbatch --gpus-per-node=0 --ntasks-per-node=1.
#
# Preemption and the time limit: Slurm sends SIGUSR1 to every rank 300 s before the limit (--signal; by
# hand: scancel --signal=USR1 JOBID). Each rank finishes its step, a checkpoint is saved, and the trainer
# exits 124; this script then requeues the job. The requeue is done here, after srun has returned, so that
# it happens only once every rank has exited and the checkpoint is complete; the requeued job resumes from
# OUTPUT/checkpoints/latest by itself, and --open-mode=append keeps each attempt's log in one file.
# SIGTERM (scancel, preemption) also saves a checkpoint before the ranks exit, within Slurm's KillWait or
# GraceTime; the job then ends (or Slurm requeues it under PreemptMode=REQUEUE) and a resubmission resumes.
# Exit status, the trainer's: 0 done; 124 stopped after a checkpoint (requeued); 2 bad settings;
# 3 too many NaN/Inf steps; anything else a crash (not requeued).
#SBATCH --job-name=lora-gpt-neox-20b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

MODEL=${MODEL:-models/gpt-neox-20b}
DATA=${DATA:-prepared/wikisql}
EVAL_DATA=${EVAL_DATA-prepared/wikisql-dev}
OUTPUT=${OUTPUT:-runs/gpt-neox-20b-lora}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
TRAIN_ARGS=${TRAIN_ARGS---lora_r 8 --lora_alpha 16 --micro_batch 4 --grad_accum 4 --grad_ckpt --max_steps 2000 --save_every 200}
PYTHON=${PYTHON:-python}
read -ra train_args <<<"$TRAIN_ARGS"

# Rank 0 runs on the first node of the allocation; the port is fixed per job, so a requeued job reuses it.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
echo "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $SLURM_JOB_NUM_NODES nodes x" \
    "$SLURM_NTASKS_PER_NODE ranks, master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT"

status=0
srun --cpus-per-task="$SLURM_CPUS_PER_TASK" "$PYTHON" launcher/train.py --model "$MODEL" --data "$DATA" \
    --eval_data "$EVAL_DATA" --output_dir "$OUTPUT" --ds_config "$DS_CONFIG" "${train_args[@]}" || status=$?
if [[ $status -eq 124 ]]; then
    echo "job $SLURM_JOB_ID: stopped after a checkpoint; requeued, it resumes from $OUTPUT/checkpoints/latest"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
