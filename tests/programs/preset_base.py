"""A preset's random base as the trainer draws it, saved as a Hugging Face model dir (with a tokenizer).

    deepspeed --num_gpus 1 tests/programs/preset_base.py --model preset:tiny-gpt-neox --tokenizer DIR --seed 42 \
        --out OUT

The trainer seeds torch with --seed and builds the base under ZeRO-3 (lora_ds.model.build_model inside
deepspeed.zero.Init), where transformers initializes each module's gathered weights on rank 0: that draws other
values than the same seed in one plain process does, and the same on any number of ranks. So this program
builds it that way and saves the gathered weights, for the tests that need the base a preset run trained on.
"""

import argparse
import shutil

import torch


def main():
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_ds

    from lora_ds.config import parse_config, resolve_ds_config
    from lora_ds.dist import init_distributed, shutdown
    from lora_ds.model import build_model
    from lora_ds.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser()
    for flag in ("--model", "--tokenizer", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    tok = load_tokenizer(args.tokenizer)
    cfg = parse_config(["--model", args.model, "--dtype", "fp32", "--micro_batch", "1", "--max_steps", "1"])
    env = init_distributed()
    torch.manual_seed(args.seed)  # as Recipe.setup does before the build
    model, keepalive = build_model(
        args.model, "fp32", resolve_ds_config(cfg, env.world_size), vocab_size=tok.vocab_size
    )
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    del keepalive
    hf_ds.unset_hf_deepspeed_config()
    if env.rank == 0:
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(state)
        plain.save_pretrained(args.out)
        shutil.copytree(args.tokenizer, args.out, dirs_exist_ok=True)
    shutdown()


if __name__ == "__main__":
    main()
