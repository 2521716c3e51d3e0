#!/bin/bash
# Any lora-ds run under Slurm: launcher/train.py's flags follow the script; one process per GPU via srun.
#
#   sbatch slurm/train.sh --model /models/llama-7b --data prepared/wikisql --output_dir runs/wikisql
#   sbatch --nodes=2 --time=4:00:00 slurm/train.sh --config my_run.yaml
#
# Copy it and edit the #SBATCH lines for your cluster. PYTHON [python] names the interpreter with lora-ds
# installed; without GPUs: DS_ACCELERATOR=cpu and sbatch --gpus-per-node=0 --ntasks-per-node=N.
# Preemption, requeue and exit status work as in slurm/gpt_neox.sh: SIGUSR1 (300 s before the limit, or
# scancel --signal=USR1 JOBID) -> checkpoint -> exit 124 -> requeued here -> resumes by itself.
#
# Without Slurm or ssh, each node runs the same `deepspeed` line with its own --node_rank:
#   deepspeed --hostfile hosts --no_ssh --node_rank K --master_addr NODE0 --master_port 29500 \
#       launcher/train.py ...
# where `hosts` names one node per line with its number of GPUs (the same file on every node):
#   gpu-node-01 slots=8
#   gpu-node-02 slots=8
#SBATCH --job-name=lora-ds
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

PYTHON=${PYTHON:-python}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
echo "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $SLURM_JOB_NUM_NODES nodes x" \
    "$SLURM_NTASKS_PER_NODE ranks, master $MASTER_ADDR:$MASTER_PORT"

status=0
srun --cpus-per-task="$SLURM_CPUS_PER_TASK" "$PYTHON" launcher/train.py "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "job $SLURM_JOB_ID: stopped after a checkpoint; requeued, it resumes from its latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
