"""launcher/train.py's runs, one after the other in the same ranks: several tiny models trained for the cost of one
launch (test_train_distributed's model families).

    deepspeed --num_gpus 2 tests/programs/train_families.py --runs RUNS.json

RUNS.json is a list of launcher/train.py argument lists. Each runs as launcher/train.py's main() runs it (Recipe:
setup, train, save); the process group, started by the first, is torn down once, after the last.
"""

import argparse
import json


def main() -> int:
    from launcher.train import Recipe
    from lora_ds.config import parse_config
    from lora_ds.dist import shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True)
    args, _ = parser.parse_known_args()  # the launcher's --local_rank too
    with open(args.runs) as f:
        runs = json.load(f)
    for argv in runs:
        recipe = Recipe(parse_config(argv))
        recipe.setup()
        code = recipe.save(recipe.train())
        if code:
            return code
        del recipe  # its engine and model, before the next run builds its own
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
