#!/usr/bin/env bash
# Stacks side by side on a GPU machine, interleaved: ROUNDS rounds of one run per stack, each run its own
# process (bench/throughput.py, its step times from CUDA events), then the ratios (bench/compare.py).
#   bench/run_gpu.sh OUT MODEL MICRO TARGETS ROUNDS STACK...
#   STACK: anchor | anchor-liger | ours | ours:"launcher flags"   (the flags also name the run);
#          a stack ending @N runs with micro-batch N instead of MICRO (anchor-liger@32: short padded rows)
# e.g. bench/run_gpu.sh "$OUT" preset:llama-3-8b 4 q_proj,v_proj 3 anchor-liger ours
# BENCH_FLAGS adds throughput.py flags to every run (e.g. "--grad_ckpt", "--lengths bench/lengths_wikisql_samsum.json"),
# NAME_SUFFIX names such a set of runs apart (e.g. _reallen). BUDGET_S (default: none) stops
# starting runs when less than the longest run so far is left of it, so that the results come back in time.
set -uo pipefail
out=$1 model=$2 micro=$3 targets=$4 rounds=$5
shift 5
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
name=$(echo "$model" | sed 's/^preset://')_${gpus}gpu_mb${micro}_$(echo "$targets" | tr ',' '_')${NAME_SUFFIX:-}
mkdir -p "$out"
start=$SECONDS longest=0
for round in $(seq 1 "$rounds"); do
  for stack in "$@"; do
    if [ -n "${BUDGET_S:-}" ] && [ $((SECONDS - start + longest)) -gt "$BUDGET_S" ]; then
      echo "run_gpu: budget ${BUDGET_S}s reached; stopping before round $round $stack"
      break 2
    fi
    mb=$micro
    case $stack in *@*) mb=${stack##*@} stack=${stack%@*} ;; esac
    kind=${stack%%:*} flags=""
    [ "$kind" != "$stack" ] && flags=${stack#*:}
    tag=$kind$(echo "$flags" | tr -c 'A-Za-z0-9\n' '-' | sed 's/--*/-/g; s/-$//')
    [ "$mb" != "$micro" ] && tag=$tag-mb$mb
    profile=()
    [ "$kind" = ours ] && [ "$round" = 1 ] && profile=(--profile "$out/${name}_${tag}_profile.txt")
    t0=$SECONDS
    deepspeed --num_gpus "$gpus" bench/throughput.py --stack "$kind" --model "$model" --micro_batch "$mb" \
      --targets "$targets" --tag "$tag" --ours_flags "$flags" "${profile[@]}" ${BENCH_FLAGS:-} \
      > "$out/${name}_${tag}_r$round.log" 2>&1
    grep '^BENCH ' "$out/${name}_${tag}_r$round.log" | sed "s/^BENCH {/{\"round\": $round, /" >> "$out/$name.jsonl" \
      || tail -30 "$out/${name}_${tag}_r$round.log"
    [ $((SECONDS - t0)) -gt "$longest" ] && longest=$((SECONDS - t0))
    echo "run_gpu: round $round $tag $((SECONDS - t0))s"
  done
done
python3 bench/compare.py "$out/$name.jsonl"
