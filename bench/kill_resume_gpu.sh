#!/usr/bin/env bash
# kill -9 of a rank mid-run, then the same command again: does the resumed run end with the adapter of a run never
# stopped? A second uninterrupted run shows whether the kernels are deterministic at all on this machine.
#   bench/kill_resume_gpu.sh OUT_DIR [MODEL] [STEPS] [KILL_AFTER_STEP]
# e.g. bench/kill_resume_gpu.sh "$OUT" preset:pythia-1.4b 30 17      (DTYPE=fp32 GPUS=2 on CPU with DS_ACCELERATOR=cpu)
set -uo pipefail
out=$1 model=${2:-preset:pythia-1.4b} steps=${3:-30} kill_after=${4:-17}
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
mkdir -p "$out"
port=$((29000 + RANDOM % 1000))
start() {  # output dir; runs in the background, its launcher's pid in $!
  deepspeed --num_gpus "$gpus" --master_port "$port" launcher/train.py --model "$model" --max_steps "$steps" \
    --save_every 5 --dtype "${DTYPE:-bf16}" --ds_config ds_configs/zero3.json --output_dir "$1" >> "$1.log" 2>&1 &
}
for run in whole whole2; do
  start "$out/$run"; wait $!; echo "$run: exit $?"
done
start "$out/killed"
launcher=$!
until [ "$( (wc -l < "$out/killed/metrics.jsonl") 2>/dev/null || echo 0)" -ge "$kill_after" ]; do
  kill -0 "$launcher" 2>/dev/null || { echo "killed run ended before step $kill_after"; tail -30 "$out/killed.log"; exit 1; }
  sleep 0.2
done
victim=$(pgrep -f "local_rank=$((gpus - 1)) .*--output_dir $out/killed" | head -1)
kill -9 "$victim"
wait "$launcher"
first_exit=$?
echo "killed: rank $((gpus - 1)) (pid $victim) after step $(wc -l < "$out/killed/metrics.jsonl"); launcher exit $first_exit;" \
  "latest=$(cat "$out/killed/checkpoints/latest")"
start "$out/killed"; wait $!; echo "rerun: exit $?"
python3 - "$out" "$first_exit" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out, first_exit = Path(sys.argv[1]), int(sys.argv[2])
adapters = {r: load_file(out / r / "adapter" / "adapter_model.safetensors") for r in ("whole", "whole2", "killed")}
losses = {r: [json.loads(l)["loss"] for l in (out / r / "metrics.jsonl").read_text().splitlines()] for r in adapters}
def diff(a, b):
    x, y = adapters[a], adapters[b]
    return {"equal": all(torch.equal(x[k], y[k]) for k in x),
            "max_abs_diff": max((x[k].float() - y[k].float()).abs().max().item() for k in x),
            "losses_equal": losses[a] == losses[b]}
resumed = [l for l in (out / "killed.log").read_text().splitlines() if "resumed from" in l]
result = {"killed_launcher_exit": first_exit, "resumed": resumed[-1].split("resumed from")[-1].strip() if resumed else None,
          "tensors": len(adapters["whole"]), "whole_vs_whole2": diff("whole", "whole2"),
          "whole_vs_killed_resumed": diff("whole", "killed")}
print("RESULT " + json.dumps(result))
(out / "kill_resume.json").write_text(json.dumps(result, indent=1))
PY
