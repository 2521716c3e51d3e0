"""Host time of ours' forward, backward and optimizer step on the CPU: the Python that a GPU waits for once the
host falls behind (after a sync, the GPU idles for the host's whole step() call).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 bench/host_phases.py [--deepspeed_step]

A GPT-NeoX of pythia-6.9b's depth and tensor count (32 layers, LoRA on query_key_value) at width 64, so that compute
is negligible and the times are host work: DeepSpeed's hooks and step, ours. --deepspeed_step leaves DeepSpeed's
step as shipped (every resident param partitioned and gathered again), without
lora_ds.zero.keep_frozen_persistent_gathered. Prints `PHASES {...}`: median and best milliseconds of each phase
over the steps after the first three.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402

import lora_ds.build  # noqa: E402
from lora_ds.model import PRESETS  # noqa: E402

PRESETS["host-probe-neox32"] = (
    "gpt_neox",
    dict(
        hidden_size=64,
        num_hidden_layers=32,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=1024,
        vocab_size=512,
        rotary_pct=0.25,
    ),
)
TIMES: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}


def timed(engine) -> None:
    for name, seconds in TIMES.items():
        original = getattr(engine, name)

        def clocked(*args, _original=original, _seconds=seconds, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _seconds.append(time.perf_counter() - start)

        setattr(engine, name, clocked)


def main() -> None:
    deepspeed_step = "--deepspeed_step" in sys.argv
    if deepspeed_step:
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

        DeepSpeedZeRoOffload._lora_ds_keeps_frozen = True  # seen as patched: the patch is never applied
    build = lora_ds.build.build

    def build_timed(*args, **kwargs):
        trainable, engine = build(*args, **kwargs)
        timed(engine)
        return trainable, engine

    lora_ds.build.build = build_timed  # throughput.run_ours imports it at call time
    sys.argv = [sys.argv[0], "--stack", "ours", "--model", "preset:host-probe-neox32", "--micro_batch", "1"]
    sys.argv += ["--seq", "16", "--steps", "15", "--warmup_steps", "3", "--targets", "query_key_value"]
    throughput.main()
    result = {
        name: {"median_ms": 1e3 * statistics.median(s[3:]), "best_ms": 1e3 * min(s[3:])} for name, s in TIMES.items()
    }
    print("PHASES " + json.dumps({"deepspeed_step": deepspeed_step, **result}))


if __name__ == "__main__":
    main()
