"""This rank's view of its launcher: lora_ds.dist.discover() as JSON in OUT/discover_rank<r>.json (each rank writes
its own file: ranks printing to one forwarded stdout can interleave within a line).

    mpirun -np 2 python tests/programs/rank_probe.py --out DIR [--drop VAR ...]   # test_mpi
    srun --nodes=2 python tests/programs/rank_probe.py --out DIR --slurm          # test_slurm

--drop removes variables the launcher set before discover() reads them; --slurm adds the Slurm job id ("job")
and node name ("node") of the step.
"""

import argparse
import dataclasses
import json
import os

from lora_ds.dist import discover


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--drop", nargs="*", default=[])
    parser.add_argument("--slurm", action="store_true")
    args = parser.parse_args()
    for name in args.drop:
        os.environ.pop(name)
    found = dataclasses.asdict(discover())
    if args.slurm:
        found.update(job=int(os.environ["SLURM_JOB_ID"]), node=os.environ["SLURMD_NODENAME"])
    with open(os.path.join(args.out, f"discover_rank{found['rank']}.json"), "w") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main()
