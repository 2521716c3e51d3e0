"""PNG figures (matplotlib's Agg canvas, no display, no pyplot global state).

analysis_figures(analysis, out_dir)   spectra, effective rank, φ heatmaps, amplification (lora-ds analyze)
read_metrics(path)                    a run's metrics.jsonl, one record per step
metrics_figures(records, out_dir)     loss, gradient norm, lr, tokens/s and peak memory against step (lora-ds plot)
"""

from __future__ import annotations

import math
import os

from lora_ds.errors import UserError
from lora_ds.fsutil import read_jsonl


def _figure(rows: int = 1, cols: int = 1, size=(5.0, 3.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, out_dir: str, name: str, written: list) -> None:
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    written.append(name)


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


# ---------------------------------------------------------------- lora-ds analyze


def analysis_figures(analysis: dict, out_dir: str) -> list[str]:
    """Write the figures of an analysis (analyze.analyze's dict) to `out_dir`; returns their file names."""
    written = []
    adapters = analysis["adapters"]
    _spectra(adapters, out_dir, written)
    _effective_rank(adapters, out_dir, written)
    if analysis.get("subspace_similarity") is not None:
        for side in ("input", "output"):
            _subspace(analysis["subspace_similarity"], adapters, side, out_dir, written)
    if all("amplification" in rec for a in adapters for rec in a["modules"].values()):
        _amplification(adapters, out_dir, written)
    return written


def _spectra(adapters: list, out_dir: str, written: list) -> None:
    fig, axes = _figure(1, len(adapters))
    for ax, adapter in zip(axes, adapters):
        for module, rec in adapter["modules"].items():
            ax.semilogy(range(1, len(rec["singular_values"]) + 1), rec["singular_values"], marker=".", label=module)
        ax.set(title=f"singular values of ΔW, r={adapter['r']}", xlabel="i", ylabel="σ_i")
    axes[0].legend(fontsize=6)
    _save(fig, out_dir, "spectra.png", written)


def _effective_rank(adapters: list, out_dir: str, written: list) -> None:
    fig, axes = _figure(1, 2, size=(6.0, 3.5))
    modules = sorted({m for a in adapters for m in a["modules"]})
    width = 0.8 / len(adapters)
    for k, adapter in enumerate(adapters):
        xs = [i + k * width for i, m in enumerate(modules) if m in adapter["modules"]]
        recs = [adapter["modules"][m] for m in modules if m in adapter["modules"]]
        axes[0].bar(xs, [r["effective_rank"] for r in recs], width, label=f"r={adapter['r']}")
        axes[1].bar(xs, [r["energy"][0] for r in recs], width, label=f"r={adapter['r']}")
    for ax, title in zip(axes, ("effective rank of ΔW", "energy in the top singular value")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(modules))], modules, rotation=90, fontsize=6)
        ax.set_title(title)
        ax.legend(fontsize=7)
    _save(fig, out_dir, "effective_rank.png", written)


def _subspace(pair: dict, adapters: list, side: str, out_dir: str, written: list) -> None:
    r_a, r_b = adapters[0]["r"], adapters[1]["r"]
    names = list(pair["modules"])
    rows, cols = _grid(len(names))
    fig, axes = _figure(rows, cols, size=(3.2, 3.0))
    for ax, module in zip(axes, names):
        phi = pair["modules"][module][side]
        image = ax.imshow(
            phi,
            vmin=0,
            vmax=1,
            cmap="viridis",
            origin="upper",
            aspect="auto",
            extent=(0.5, len(phi[0]) + 0.5, len(phi) + 0.5, 0.5),
        )
        ax.set_title(module, fontsize=7)
        ax.set_xlabel(f"j (r={r_b})", fontsize=7)
        ax.set_ylabel(f"i (r={r_a})", fontsize=7)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes[: len(names)], shrink=0.8, label="φ(i, j)")
    fig.suptitle(f"subspace similarity of ΔW's {side} singular vectors")
    _save(fig, out_dir, f"subspace_{side}.png", written)


def _amplification(adapters: list, out_dir: str, written: list) -> None:
    fig, axes = _figure(1, len(adapters), size=(6.0, 3.5))
    keys = (
        ("proj_delta_w", "‖UᵀWV‖, U,V of ΔW"),
        ("proj_w", "‖UᵀWV‖, U,V of W"),
        ("proj_random", "‖UᵀWV‖, random U,V"),
        ("delta_w_fro", "‖ΔW‖"),
    )
    for ax, adapter in zip(axes, adapters):
        names = list(adapter["modules"])
        w = 0.8 / len(keys)
        for k, (key, label) in enumerate(keys):
            ax.bar(
                [i + k * w for i in range(len(names))],
                [adapter["modules"][m]["amplification"][key] for m in names],
                w,
                label=label,
            )
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, rotation=90, fontsize=6)
        ax.set_title(f"amplification (Table 7), r={adapter['r']}")
        ax.legend(fontsize=6)
    _save(fig, out_dir, "amplification.png", written)


# ---------------------------------------------------------------- lora-ds plot


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl by step. The trainer drops the records past the checkpoint it resumes
    from; should a file still hold a step twice (concatenated logs), the later record wins."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; give a run's output dir (the one holding metrics.jsonl)")
    by_step = {}
    for number, record in read_jsonl(path):
        if not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number}: a record needs an integer 'step'")
        by_step[record["step"]] = record
    if not by_step:
        raise UserError(f"{path}: no records; the run logged no step yet")
    return [by_step[s] for s in sorted(by_step)]


METRIC_FIGURES = (
    ("loss.png", ("loss", "eval_loss"), "loss"),
    ("grad_norm.png", ("grad_norm",), "gradient norm (before clipping)"),
    ("lr.png", ("lr",), "learning rate"),
    ("tokens_per_s.png", ("tokens_per_s",), "tokens / s"),
    ("peak_mem.png", ("peak_mem_gib",), "peak memory (GiB)"),
)


def metrics_figures(records: list[dict], out_dir: str) -> list[str]:
    """One PNG per curve of `records` (read_metrics); a curve no record holds is left out."""
    written = []
    for name, keys, label in METRIC_FIGURES:
        series = [(key, [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]) for key in keys]
        series = [(key, points) for key, points in series if points]
        if not series:
            continue
        fig, (ax,) = _figure()
        for key, points in series:
            steps, values = zip(*points)
            # eval_loss is logged only on eval steps: markers, so one point still shows.
            ax.plot(steps, values, label=key, marker="o" if key == "eval_loss" else None)
        ax.set(xlabel="step", ylabel=label)
        if len(series) > 1:
            ax.legend()
        _save(fig, out_dir, name, written)
    return written
