"""Section 7 of the LoRA paper (Hu et al. 2021) as measurements over adapter dirs.

    spectrum(A, B, s)            singular values of ΔW = s·B·A from the factors: QR of B and Aᵀ, SVD of the
                                 r×r core; never an SVD of the d×d product
    subspace_similarity(U1, U2)  φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)   (Figures 3-4)
    amplification(W, ΔW's U, V)  ‖ΔW‖_F / ‖Uᵀ W V‖_F beside ‖Uᵀ W V‖_F for W's own and random directions (Table 7)
    analyze(adapters, base, out) all of the above over every adapted matrix -> analysis.json + figures

Every ΔW is taken in nn.Linear layout (out, in): GPT-2 Conv1D bases store the transpose (fan_in_fan_out),
so their base weights are transposed on reading. "output" vectors are ΔW's left singular vectors (its column
space, in R^out), "input" vectors its right singular vectors (in R^in, the row space of A: the space the
paper compares through A's right singular vectors).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lora_ds.adapter import adapted_modules, factors, module_rank, read_adapter, scaling
from lora_ds.errors import UserError
from lora_ds.fsutil import atomic_dir, write_json
from lora_ds.hf_dir import read_model_dir

ANALYSIS_FILE = "analysis.json"
DEFINITIONS = {
    "delta_w": "ΔW = s·B·A in nn.Linear layout (out, in), s = lora_alpha/r (or /sqrt(r) with rsLoRA); GPT-2 "
    "Conv1D (fan_in_fan_out) bases are transposed to this layout",
    "singular_values": "of ΔW, descending, from the factors: B = Q_B R_B, Aᵀ = Q_A R_A, SVD of s·R_B R_Aᵀ (r×r)",
    "energy": "energy[k-1] = sum of the top-k squared singular values / sum of all (fraction of ‖ΔW‖²_F)",
    "effective_rank": "exp(entropy of p), p_i = σ_i / Σσ (Roy & Vetterli 2007): 1 for rank one, r for r equal "
    "singular values",
    "subspace_similarity": "phi[i-1][j-1] = ‖U1_iᵀ U2_j‖²_F / min(i, j), U_i the top-i singular vectors of ΔW; "
    "'input': right singular vectors (R^in, the paper's choice via A), 'output': left "
    "(R^out). Two random subspaces give about max(i, j) / d",
    "amplification": "‖ΔW‖_F / ‖Uᵀ W V‖_F, U, V the top-r left/right singular vectors of ΔW (paper Table 7); "
    "beside it ‖Uᵀ W V‖_F for U, V the top-r singular vectors of W, and for random orthonormal "
    "U, V (seed 0), and ‖W‖_F",
}


@dataclass
class Spectrum:
    """ΔW = U diag(S) Vᵀ, thin (k = the rank of the factors): U (out, k), S (k,), V (in, k), float64."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def spectrum(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> Spectrum:
    """Thin SVD of s·B·A (out, in) from A (r, in) and B (out, r), at the cost of two QRs and an r×r SVD."""
    q_b, r_b = torch.linalg.qr(lora_B.double())
    q_a, r_a = torch.linalg.qr(lora_A.double().T)
    u, s, vh = torch.linalg.svd(scale * r_b @ r_a.T)
    return Spectrum(q_b @ u, s, q_a @ vh.T)


def energy(s: torch.Tensor) -> list[float]:
    """Cumulative fraction of Σσ² in the top-k singular values, k = 1..len(s)."""
    sq = s.double() ** 2
    total = sq.sum()
    return (sq.cumsum(0) / total).tolist() if total > 0 else [0.0] * len(s)


def effective_rank(s: torch.Tensor) -> float:
    """exp(H(p)), p = σ / Σσ (Roy & Vetterli 2007); 0 for ΔW = 0."""
    total = s.double().sum()
    if total <= 0:
        return 0.0
    p = s.double() / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for all i ≤ u1's columns, j ≤ u2's: ‖u1[:, :i]ᵀ u2[:, :j]‖²_F / min(i, j), shape (k1, k2)."""
    sq = (u1.double().T @ u2.double()) ** 2
    overlap = sq.cumsum(0).cumsum(1)
    i = torch.arange(1, sq.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, sq.shape[1] + 1, dtype=torch.float64)[None, :]
    return overlap / torch.minimum(i, j)


def _random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))[0]


def amplification(weight: torch.Tensor, spec: Spectrum, r: int, seed: int = 0) -> dict:
    """Table 7 for one matrix: `weight` (out, in) against ΔW's top-r directions, its own, and random ones."""
    w = weight.double()
    u, v = spec.U[:, :r], spec.V[:, :r]
    projected = torch.linalg.matrix_norm(u.T @ w @ v).item()
    # ‖U_Wᵀ W V_W‖_F over W's own top-r singular vectors is the norm of its top-r singular values.
    own = torch.linalg.svdvals(w)[:r].norm().item()
    generator = torch.Generator().manual_seed(seed)
    ru, rv = _random_orthonormal(w.shape[0], r, generator), _random_orthonormal(w.shape[1], r, generator)
    random = torch.linalg.matrix_norm(ru.T @ w @ rv).item()
    delta_norm = spec.S.norm().item()
    return {
        "delta_w_fro": delta_norm,
        "w_fro": torch.linalg.matrix_norm(w).item(),
        "proj_delta_w": projected,
        "proj_w": own,
        "proj_random": random,
        "amplification": delta_norm / projected if projected > 0 else float("inf"),
    }


# ---------------------------------------------------------------- adapters and bases


@dataclass
class Adapter:
    path: str
    config: dict
    scale: float
    spectra: dict  # module -> Spectrum
    shapes: dict  # module -> [out, in]


def load_adapter(path: str, progress: bool = False) -> Adapter:
    """An adapter dir with the spectrum of every adapted matrix."""
    from tqdm import tqdm

    config, tensors = read_adapter(path)
    scale = scaling(config)
    spectra, shapes = {}, {}
    for module in tqdm(adapted_modules(tensors), desc=f"spectra r={config['r']}", disable=not progress):
        A, B = factors(tensors, module)
        spectra[module] = spectrum(A, B, scaling(config, module))
        shapes[module] = [B.shape[0], A.shape[1]]
    return Adapter(os.path.abspath(path), config, scale, spectra, shapes)


def iter_base_weights(base_dir: str, modules, fan_in_fan_out: bool):
    """(module, weight (out, in)) for each module, read one tensor at a time, shard by shard."""
    from safetensors import safe_open

    base = read_model_dir(base_dir, "--base")
    keys = {}
    for module in modules:
        keys[module] = base.weight_key(module)
        if keys[module] is None:
            raise UserError(
                f"--base {base_dir}: no weight for the adapter's {module}; the adapter was trained on another base"
            )
    for shard in base.shards:
        mine = [m for m in modules if base.where[keys[m]] is shard]
        if not mine:
            continue
        with safe_open(shard.path, framework="pt") as reader:
            for module in mine:
                weight = reader.get_tensor(keys[module])
                yield module, (weight.T if fan_in_fan_out else weight)


# ---------------------------------------------------------------- the whole analysis


def _matrix_record(spec: Spectrum) -> dict:
    return {
        "singular_values": spec.S.tolist(),
        "energy": energy(spec.S),
        "effective_rank": effective_rank(spec.S),
        "delta_w_fro": spec.S.norm().item(),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _adapter_summary(modules: dict) -> dict:
    return {
        "mean_effective_rank": _mean(m["effective_rank"] for m in modules.values()),
        "mean_energy_top1": _mean(m["energy"][0] for m in modules.values()),
        **(
            {"mean_amplification": _mean(m["amplification"]["amplification"] for m in modules.values())}
            if all("amplification" in m for m in modules.values())
            else {}
        ),
    }


def _pair(a: Adapter, b: Adapter) -> dict:
    common = sorted(set(a.spectra) & set(b.spectra))
    if not common:
        raise UserError(f"--adapter {a.path} and --adapter {b.path} adapt no module in common; nothing to compare")
    for m in common:
        if a.shapes[m] != b.shapes[m]:
            raise UserError(
                f"{m}: ΔW is {a.shapes[m]} in {a.path} but {b.shapes[m]} in {b.path}; the adapters "
                "were trained on different bases"
            )
    modules = {}
    for m in common:
        modules[m] = {
            side: subspace_similarity(getattr(a.spectra[m], vec), getattr(b.spectra[m], vec)).tolist()
            for side, vec in (("input", "V"), ("output", "U"))
        }
    k = min(len(modules[common[0]]["input"]), len(modules[common[0]]["input"][0]))
    summary = {
        side: {
            "mean_phi_diag": [_mean(modules[m][side][i][i] for m in common) for i in range(k)],
            "mean_phi_top1_vs_all": _mean(modules[m][side][0][-1] for m in common),
            "random_phi_diag": [
                _mean((i + 1) / a.shapes[m][1 if side == "input" else 0] for m in common) for i in range(k)
            ],
        }
        for side in ("input", "output")
    }
    return {"a": a.path, "b": b.path, "modules": modules, "summary": summary}


def analyze(adapter_dirs: list[str], out_dir: str, base_dir: str | None = None, progress: bool = True) -> dict:
    """Spectra of every adapter, φ between the first two, amplification against `base_dir`; writes
    `out_dir`/analysis.json and PNG figures (replacing `out_dir`). Returns the analysis."""
    from tqdm import tqdm

    from lora_ds import plots

    if not 1 <= len(adapter_dirs) <= 2:
        raise UserError(f"--adapter given {len(adapter_dirs)} times; give one adapter, or two to compare")
    out_dir = os.path.abspath(out_dir)
    for path in [*adapter_dirs, *([base_dir] if base_dir else [])]:
        path = os.path.abspath(path)
        if path == out_dir or path.startswith(out_dir + os.sep):
            raise UserError(f"--out {out_dir}: would replace {path}; choose another output dir")
    adapters = [load_adapter(p, progress) for p in adapter_dirs]
    result = {"definitions": DEFINITIONS, "adapters": []}
    for adapter in adapters:
        record = {
            "path": adapter.path,
            "r": adapter.config["r"],
            "lora_alpha": adapter.config["lora_alpha"],
            "scaling": adapter.scale,
            "fan_in_fan_out": bool(adapter.config.get("fan_in_fan_out")),
            "modules": {},
        }
        for module, spec in adapter.spectra.items():
            record["modules"][module] = {"shape": adapter.shapes[module], **_matrix_record(spec)}
        if base_dir is not None:
            weights = iter_base_weights(base_dir, list(adapter.spectra), record["fan_in_fan_out"])
            for module, weight in tqdm(
                weights, total=len(adapter.spectra), desc=f"base r={adapter.config['r']}", disable=not progress
            ):
                if list(weight.shape) != adapter.shapes[module]:
                    raise UserError(
                        f"--base {base_dir}: {module}'s weight is {list(weight.shape)} (out, in) but "
                        f"the adapter's ΔW is {adapter.shapes[module]}; the adapter was trained on "
                        "another base"
                    )
                record["modules"][module]["amplification"] = amplification(
                    weight, adapter.spectra[module], module_rank(adapter.config, module)
                )
            record["base"] = os.path.abspath(base_dir)
        record["summary"] = _adapter_summary(record["modules"])
        result["adapters"].append(record)
    if len(adapters) == 2:
        result["subspace_similarity"] = _pair(*adapters)
    with atomic_dir(out_dir) as tmp:
        result["figures"] = plots.analysis_figures(result, tmp)
        write_json(os.path.join(tmp, ANALYSIS_FILE), result)
    return result
