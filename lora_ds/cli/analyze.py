"""Section-7 analyses of LoRA adapters: ΔW spectra, subspace similarity between two adapters, amplification.

    lora-ds analyze --adapter runs/r4/adapter --out analysis/r4
    lora-ds analyze --adapter runs/r4/adapter --adapter runs/r16/adapter --out analysis/r4-vs-r16
    lora-ds analyze --adapter runs/wikisql/adapter --base /models/llama-7b --out analysis/wikisql

For every adapted matrix: the singular values of ΔW = s·B·A (from the factors: two QRs and an r×r SVD), the
energy in the top-k and the effective rank. With two adapters: φ(i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j) over
ΔW's top singular vectors (the paper's Figures 3-4). With --base: ‖ΔW‖_F / ‖Uᵀ W V‖_F against W's own and
random directions (Table 7), the base read one tensor at a time. Writes OUT/analysis.json (definitions
included) and PNG figures; OUT is replaced.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="ADAPTER_DIR",
        help="PEFT LoRA adapter dir; give it twice to compare two adapters",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="MODEL_DIR",
        help="the adapters' base model dir (safetensors): adds the amplification factor",
    )
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="where analysis.json and the figures go")


def run(args) -> int:
    import json

    from lora_ds.analyze import analyze

    result = analyze(args.adapter, args.out, base_dir=args.base)
    summary = {
        "out": args.out,
        "figures": result["figures"],
        "adapters": [{"path": a["path"], "r": a["r"], **a["summary"]} for a in result["adapters"]],
    }
    if "subspace_similarity" in result:
        summary["subspace_similarity"] = result["subspace_similarity"]["summary"]
    print(json.dumps(summary, indent=2))
    return 0
