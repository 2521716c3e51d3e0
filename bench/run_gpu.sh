#!/usr/bin/env bash
# One benchmark run on a GPU machine: the anchor (HF Trainer + PEFT + DeepSpeed ZeRO-3, with the Hugging Face
# style "auto" ZeRO-3 config) and ours with each given DeepSpeed config, on the same model shape,
# micro-batch, length and steps; then the ratios.
#   bench/run_gpu.sh OUT_DIR MODEL MICRO_BATCH DS_CONFIG...
# e.g. bench/run_gpu.sh "$OUT" preset:pythia-6.9b 4 ds_configs/zero3.json bench/zero3_h200.json
set -uo pipefail
out=$1 model=$2 micro=$3
shift 3
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
name=$(echo "$model" | tr -c 'A-Za-z0-9.\n-' '_')_${gpus}gpu_mb${micro}
mkdir -p "$out"
run() {  # label, then throughput.py flags
  local label=$1
  shift
  deepspeed --num_gpus "$gpus" bench/throughput.py --model "$model" --micro_batch "$micro" --tag "$label" "$@" \
    > "$out/${name}_${label}.log" 2>&1
  grep '^BENCH ' "$out/${name}_${label}.log" | sed 's/^BENCH //' >> "$out/${name}.jsonl" \
    || tail -40 "$out/${name}_${label}.log"
}
run anchor --stack anchor --ds_config bench/anchor_zero3.json ${BENCH_FLAGS:-}
for ds in "$@"; do
  run "ours-$(basename "$ds" .json)" --stack ours --ds_config "$ds" ${BENCH_FLAGS:-}
done
python3 bench/compare.py "$out/${name}.jsonl"
