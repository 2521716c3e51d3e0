#!/bin/bash
# LoRA on GPT-NeoX-20B (ZeRO-3) across N nodes of 8 GPUs: one process per GPU, started by srun (no ssh).
#
#   sbatch slurm/gpt_neox.sh                         # from the repository root: 4 nodes x 8 GPUs
#   sbatch --nodes=8 slurm/gpt_neox.sh               # sbatch flags win over the #SBATCH lines below
#   MODEL=/models/gpt-neox-20b OUTPUT=runs/neox-sql sbatch slurm/gpt_neox.sh
#
# Settings: environment variables of the sbatch command (the job inherits them); defaults in brackets.
#   MODEL       Hugging Face model dir                                 [models/gpt-neox-20b]
#   DATA        prepared dir (lora-ds prep) or prompt/completion JSONL  [prepared/wikisql]
#   EVAL_DATA   held-out split, "" for none                            [prepared/wikisql-dev]
#   OUTPUT      run dir: checkpoints/, metrics.jsonl, adapter/         [runs/gpt-neox-20b-lora]
#   DS_CONFIG   DeepSpeed config                                       [ds_configs/zero3.json]
#   TRAIN_ARGS  more launcher/train.py flags, --config FILE too        [--lora_r 8 ... below]
#   PYTHON      interpreter with lora-ds installed                     [python]
# Without GPUs (as the tests run it): DS_ACCELERATOR=cpu, sbatch --gpus-per-node=0 --ntasks-per-node=1.
#
# The launch is slurm/train.sh's, run inside this job: the master is the allocation's first node, the port
# follows the job id, srun starts the ranks. SIGUSR1 arrives 300 s before the time limit: the ranks save a
# checkpoint and exit 124, the job requeues itself and resumes from OUTPUT/checkpoints/latest (train.sh's
# header has the details and the exit statuses).
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
read -ra train_args <<<"$TRAIN_ARGS"
echo "MODEL=$MODEL DATA=$DATA EVAL_DATA=$EVAL_DATA OUTPUT=$OUTPUT DS_CONFIG=$DS_CONFIG TRAIN_ARGS=$TRAIN_ARGS"

exec bash slurm/train.sh --model "$MODEL" --data "$DATA" --eval_data "$EVAL_DATA" --output_dir "$OUTPUT" \
    --ds_config "$DS_CONFIG" "${train_args[@]}"
