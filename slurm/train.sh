#!/bin/bash
# Any lora-ds run under Slurm: launcher/train.py's flags follow the script; one process per GPU, started by
# srun on every node of the allocation (no ssh).
#
#   sbatch slurm/train.sh --model /models/llama-7b --data prepared/wikisql --output_dir runs/wikisql
#   sbatch --nodes=2 --time=4:00:00 slurm/train.sh --config my_run.yaml     # sbatch flags win over #SBATCH
#
# Submit from the repository root; copy the script and edit the #SBATCH lines for your cluster.
# PYTHON [python] names the interpreter with lora-ds installed (the job inherits sbatch's environment).
# Without GPUs: DS_ACCELERATOR=cpu and sbatch --gpus-per-node=0 --ntasks-per-node=N.
#
# Preemption and the time limit: Slurm sends SIGUSR1 to every rank 300 s before the limit (--signal; by
# hand: scancel --signal=USR1 JOBID). Each rank finishes its step, a checkpoint is saved, and the trainer
# exits 124; this script then requeues the job (--requeue allows it). It does so after srun has returned,
# that is once every rank has exited and the checkpoint is complete; the requeued job resumes from
# OUTPUT/checkpoints/latest by itself, and --open-mode=append keeps every attempt's log in one file.
# SIGTERM (scancel, preemption) also saves a checkpoint before the ranks exit, within Slurm's KillWait or
# GraceTime; the job then ends (or Slurm requeues it, under PreemptMode=REQUEUE) and resubmitting resumes.
# Exit status, the trainer's: 0 done; 124 stopped after a checkpoint (requeued); 2 bad settings;
# 3 too many NaN/Inf steps; anything else a crash (not requeued; resubmit to resume from `latest`).
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

# Rank 0 runs on the first node; the port is fixed per job id, which a requeued job keeps.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
echo "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $SLURM_JOB_NUM_NODES nodes x" \
    "$SLURM_NTASKS_PER_NODE ranks, master $MASTER_ADDR:$MASTER_PORT"

# Rank 0 writes the checkpoint's tag here when the run stops for a requeue (see below); beside the job's log.
export LORA_DS_STOPPED_FILE="${SLURM_SUBMIT_DIR:-$PWD}/.lora-ds-$SLURM_JOB_ID.stopped"
rm -f "$LORA_DS_STOPPED_FILE"
status=0
# Slurm 22.05's srun does not inherit --cpus-per-task from sbatch. --kill-on-bad-exit: a rank that dies
# (kill -9, the OOM killer, a lost node) ends the step at once instead of leaving the others blocked in a
# collective; the job then fails, and resubmitting it resumes from the last complete checkpoint. It also
# counts a rank's 124 as a bad exit and may kill the last ranks as they exit 124 too, so the stop is read from
# LORA_DS_STOPPED_FILE, not from srun's status.
srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" "${PYTHON:-python}" launcher/train.py "$@" \
    || status=$?
if [[ -f $LORA_DS_STOPPED_FILE ]]; then
    echo "job $SLURM_JOB_ID: stopped after checkpoint $(cat "$LORA_DS_STOPPED_FILE"); requeued, it resumes from there"
    rm -f "$LORA_DS_STOPPED_FILE"
    scontrol requeue "$SLURM_JOB_ID"
    status=124
fi
exit "$status"
