"""lora-ds analyze and plot: synthetic factors with known spectra, overlaps and base weights give the known
numbers; the figures are written and non-empty."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lora_ds.adapter import peft_config, write_adapter
from lora_ds.analyze import amplification, analyze, effective_rank, energy, spectrum, subspace_similarity
from lora_ds.cli import main
from lora_ds.plots import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _factors(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, seed: int = 0):
    """A, B with B·A = U diag(s) Vᵀ, mixed by a random invertible r×r matrix so neither factor is orthogonal."""
    r = s.numel()
    mix = torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 3 * torch.eye(r)
    return torch.linalg.solve(mix, torch.diag(s) @ v.T).float(), (u @ mix).float()


def _write(path, A, B, r, alpha, fan_in_fan_out=False, modules=("model.layers.0.q", "model.layers.1.q")):
    tensors = {}
    for m in modules:
        tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = A.clone(), B.clone()
    write_adapter(
        str(path),
        tensors,
        peft_config(
            r=r,
            alpha=alpha,
            dropout=0.0,
            target_modules=["q"],
            use_rslora=False,
            fan_in_fan_out=fan_in_fan_out,
            base_model="t",
        ),
    )
    return str(path)


def test_spectrum_from_factors_has_the_known_singular_values_and_vectors():
    u, v = _orthonormal(40, 4, 1), _orthonormal(24, 4, 2)
    sigma = torch.tensor([5.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    A, B = _factors(u, sigma, v)
    spec = spectrum(A, B, scale=2.0)
    assert spec.S.tolist() == pytest.approx((2 * sigma).tolist(), rel=1e-5)
    # Singular vectors up to sign, and the product rebuilt from them.
    assert (spec.U.T @ u).abs().diagonal().tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    assert (spec.V.T @ v).abs().diagonal().tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    delta = 2.0 * B.double() @ A.double()
    assert torch.allclose(spec.U @ torch.diag(spec.S) @ spec.V.T, delta, atol=1e-5)


def test_spectrum_of_a_rank_deficient_update_has_zero_tail():
    u, v = _orthonormal(16, 2, 3), _orthonormal(12, 2, 4)
    A = torch.cat([v.T, torch.zeros(2, 12, dtype=torch.float64)]).float()  # r = 4, rank 2
    B = torch.cat(
        [u * torch.tensor([3.0, 1.0], dtype=torch.float64), torch.zeros(16, 2, dtype=torch.float64)], 1
    ).float()
    assert spectrum(A, B, 1.0).S.tolist() == pytest.approx([3.0, 1.0, 0.0, 0.0], abs=1e-6)


def test_energy_and_effective_rank_of_known_spectra():
    assert energy(torch.tensor([3.0, 1.0, 0.0])) == pytest.approx([0.9, 1.0, 1.0])
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([1.5, 1.5, 1.5, 1.5])) == pytest.approx(4.0)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(1.7548, abs=1e-4)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_subspace_similarity_of_known_overlaps():
    eye = torch.eye(16, dtype=torch.float64)
    theta = 0.3
    u1 = eye[:, :4]
    # u2: first vector at angle theta from e1, then e3, e5, e2.
    u2 = torch.stack([math.cos(theta) * eye[0] + math.sin(theta) * eye[8], eye[2], eye[4], eye[1]], 1)
    phi = subspace_similarity(u1, u2)
    assert phi.shape == (4, 4)
    assert phi[0, 0].item() == pytest.approx(math.cos(theta) ** 2)
    assert phi[1, 1].item() == pytest.approx(math.cos(theta) ** 2 / 2)  # {e1, e2} vs {~e1, e3}
    assert phi[3, 1].item() == pytest.approx((math.cos(theta) ** 2 + 1) / 2)  # {e1..e4} vs {~e1, e3}
    assert phi[3, 3].item() == pytest.approx((math.cos(theta) ** 2 + 2) / 4)  # e5 is outside e1..e4
    assert phi[1, 3].item() == pytest.approx((math.cos(theta) ** 2 + 1) / 2)  # e2 is u2's fourth vector
    assert torch.allclose(subspace_similarity(u1, u1), torch.ones(4, 4, dtype=torch.float64))


def test_amplification_against_a_diagonal_base():
    # W = diag(10, 5, 1, 0.5, 0.2, 0.1) (8 x 6); ΔW = 4·e3·e3ᵀ lies along W's third direction.
    w = torch.zeros(8, 6)
    w[range(6), range(6)] = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.2, 0.1])
    A = torch.eye(6)[2:3]
    B = 4.0 * torch.eye(8)[:, 2:3]
    result = amplification(w, spectrum(A, B, 1.0), r=1)
    assert result["delta_w_fro"] == pytest.approx(4.0)
    assert result["proj_delta_w"] == pytest.approx(1.0)
    assert result["amplification"] == pytest.approx(4.0)
    assert result["proj_w"] == pytest.approx(10.0)
    assert result["w_fro"] == pytest.approx(math.sqrt(100 + 25 + 1 + 0.25 + 0.04 + 0.01))
    assert 0 < result["proj_random"] < 10.0


@pytest.fixture
def two_adapters(tmp_path):
    """r = 2 and r = 4 adapters whose ΔW share one exact input direction and one exact output direction,
    and a base dir (two shards and an index) whose weights are diag(10, 5, ...)."""
    out_dim, in_dim = 12, 10
    eye_o, eye_i = torch.eye(out_dim, dtype=torch.float64), torch.eye(in_dim, dtype=torch.float64)
    u_a, v_a = eye_o[:, [0, 1]], eye_i[:, [0, 1]]
    u_b, v_b = eye_o[:, [0, 5, 6, 7]], eye_i[:, [0, 5, 6, 7]]
    A1, B1 = _factors(u_a, torch.tensor([3.0, 1.0], dtype=torch.float64), v_a, seed=5)
    A2, B2 = _factors(u_b, torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64), v_b, seed=6)
    w = torch.zeros(out_dim, in_dim)
    w[range(in_dim), range(in_dim)] = torch.arange(in_dim, 0, -1).float()  # 10, 9, ..., 1
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file(
        {"model.layers.0.q.weight": w.clone(), "model.embed.weight": torch.ones(3, 3)},
        str(base / "model-00001-of-00002.safetensors"),
    )
    save_file({"model.layers.1.q.weight": w.clone()}, str(base / "model-00002-of-00002.safetensors"))
    (base / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {
                    "model.layers.0.q.weight": "model-00001-of-00002.safetensors",
                    "model.embed.weight": "model-00001-of-00002.safetensors",
                    "model.layers.1.q.weight": "model-00002-of-00002.safetensors",
                },
            }
        )
    )
    a = _write(tmp_path / "r2", A1, B1, r=2, alpha=2)  # s = 1
    b = _write(tmp_path / "r4", A2, B2, r=4, alpha=8)  # s = 2
    return a, b, str(base), w


def test_analyze_two_adapters_with_base_writes_known_numbers_and_figures(two_adapters, tmp_path):
    a, b, base, w = two_adapters
    result = analyze([a, b], str(tmp_path / "out"), base_dir=base, progress=False)
    on_disk = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert on_disk["figures"] == result["figures"]
    r2, r4 = on_disk["adapters"]
    assert r2["modules"]["model.layers.0.q"]["singular_values"] == pytest.approx([3.0, 1.0], rel=1e-5)
    assert r4["modules"]["model.layers.1.q"]["singular_values"] == pytest.approx([8.0, 4.0, 2.0, 1.0], rel=1e-5)
    assert r2["modules"]["model.layers.0.q"]["energy"] == pytest.approx([0.9, 1.0], rel=1e-5)
    assert r4["summary"]["mean_energy_top1"] == pytest.approx(64 / 85, rel=1e-5)
    # ΔW of r=2 lies on W's entries 10 and 9: ‖UᵀWV‖ = ‖diag(10, 9)‖ = W's own top-2 norm.
    amp = r2["modules"]["model.layers.1.q"]["amplification"]
    assert amp["proj_delta_w"] == pytest.approx(math.hypot(10, 9), rel=1e-5)
    assert amp["proj_w"] == pytest.approx(math.hypot(10, 9), rel=1e-5)
    assert amp["amplification"] == pytest.approx(math.hypot(3, 1) / math.hypot(10, 9), rel=1e-5)
    assert amp["w_fro"] == pytest.approx(math.sqrt(sum(k * k for k in range(1, 11))), rel=1e-5)
    # r=4 directions e0, e5, e6, e7 meet W's 10, 5, 4, 3.
    assert r4["modules"]["model.layers.0.q"]["amplification"]["proj_delta_w"] == pytest.approx(
        math.sqrt(100 + 25 + 16 + 9), rel=1e-5
    )
    # Shared top direction: φ(1, 1) = 1 on both sides; the second r=2 direction (e1) is in no r=4 direction.
    for side in ("input", "output"):
        phi = on_disk["subspace_similarity"]["modules"]["model.layers.0.q"][side]
        assert len(phi) == 2 and len(phi[0]) == 4
        assert phi[0][0] == pytest.approx(1.0, abs=1e-6)
        assert phi[1][1] == pytest.approx(0.5, abs=1e-6)
        assert phi[1][3] == pytest.approx(0.5, abs=1e-6)
    assert on_disk["subspace_similarity"]["summary"]["input"]["random_phi_diag"] == pytest.approx([0.1, 0.2])
    assert set(result["figures"]) == {
        "spectra.png",
        "effective_rank.png",
        "subspace_input.png",
        "subspace_output.png",
        "amplification.png",
    }
    for name in result["figures"]:
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert "effective_rank" in on_disk["definitions"] and "input" in on_disk["definitions"]["subspace_similarity"]


def test_fan_in_fan_out_adapter_on_a_transposed_base_gives_the_linear_numbers(two_adapters, tmp_path):
    """GPT-2 Conv1D: the base stores Wᵀ and ΔW is laid out transposed; the analysis sees the same matrices."""
    a, _, _, w = two_adapters
    from lora_ds.adapter import read_adapter

    _, tensors = read_adapter(a)
    conv = _write(
        tmp_path / "conv",
        tensors["model.layers.0.q.lora_A.weight"],
        tensors["model.layers.0.q.lora_B.weight"],
        r=2,
        alpha=2,
        fan_in_fan_out=True,
    )
    base = tmp_path / "conv_base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file(
        {"model.layers.0.q.weight": w.T.contiguous(), "model.layers.1.q.weight": w.T.contiguous()},
        str(base / "model.safetensors"),
    )
    linear = analyze([a], str(tmp_path / "lin"), base_dir=str(tmp_path / "base"), progress=False)
    conv_result = analyze([conv], str(tmp_path / "cv"), base_dir=str(base), progress=False)
    got = conv_result["adapters"][0]["modules"]["model.layers.0.q"]
    want = linear["adapters"][0]["modules"]["model.layers.0.q"]
    assert got["shape"] == want["shape"] == [12, 10]
    assert got["amplification"]["proj_delta_w"] == pytest.approx(want["amplification"]["proj_delta_w"], rel=1e-6)


def test_analyze_cli_one_adapter_and_refusals(two_adapters, tmp_path, capsys):
    a, b, base, _ = two_adapters
    assert main(["analyze", "--adapter", a, "--out", str(tmp_path / "one")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["figures"] == ["spectra.png", "effective_rank.png"]
    assert printed["adapters"][0]["mean_effective_rank"] == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-5
    )
    assert main(["analyze", "--adapter", a, "--adapter", b, "--adapter", a, "--out", str(tmp_path / "x")]) == 2
    assert "give one adapter, or two" in capsys.readouterr().err
    assert main(["analyze", "--adapter", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert main(["analyze", "--adapter", a, "--base", str(tmp_path / "r2"), "--out", str(tmp_path / "z")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_plot_reads_resumed_metrics_and_writes_the_five_curves(tmp_path, capsys):
    rows = [
        {
            "step": s,
            "loss": 5.0 - 0.1 * s,
            "grad_norm": 2.0 / s,
            "lr": 1e-3,
            "tokens": 100,
            "tokens_per_s": 50.0 + s,
            "peak_mem_gib": 0.5,
            "skipped_steps": 0,
        }
        for s in (1, 2, 3, 2, 3, 4)
    ]
    rows[4]["eval_loss"] = 4.9
    rows[3]["loss"] = 1.25  # the resumed run's step 2 replaces the first one's
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["loss"] == 1.25 and records[2]["eval_loss"] == 4.9
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("loss.png", "grad_norm.png", "lr.png", "tokens_per_s.png", "peak_mem.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    assert main(["plot", str(tmp_path / "bad")]) == 2
    assert "metrics.jsonl:2: not valid JSON" in capsys.readouterr().err
