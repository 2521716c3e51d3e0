"""The LoRA layer (Hu et al. 2021) and its injection into a model.

    h = W0·x + s·B·A·dropout(x),   s = alpha / r  (alpha / sqrt(r) with rsLoRA)

A is kaiming-uniform (as PEFT), B is zero, so a fresh adapter reproduces the base exactly. The layer
wraps the base layer (`base_layer`, frozen) and names its factors `lora_A` / `lora_B` as PEFT does.
Merging is explicit (`merge()` / `unmerge()`), computed in fp32 and cast once.

DoRA (Liu et al. 2024, `use_dora`) adds a trainable magnitude m per output feature (`lora_magnitude_vector`,
PEFT's name), initialised to the row norms of W0, and rescales each output row of the adapted weight:

    h = m / ||W0 + s·B·A||_row · (W0 + s·B·A)·x     (the norm detached from the graph, as the paper and PEFT)

`init_lora_weights` (PEFT's name and values) picks the initial factors: `default` (above), `gaussian`
(A ~ N(0, std 1/r), B = 0), or, from W0 itself, `pissa` (Meng et al. 2024: A, B from W0's top r singular triplets,
each taking sqrt(S / s); `pissa_niter_N`: the same from torch.svd_lowrank with N subspace iterations) and `olora`
(Büyükakyüz 2024: B, A = the first r columns of Q and rows of R of W0 = Q·R). Those two move the principal part
into the adapter and train on the residual base W_res = W0 - s·B0·A0 (fp32 math with the factors as the layer
holds them, one cast to W0's dtype), so the model starts as the base. lora-ds never saves the base: a resume
recomputes W_res from the original W0 (the same decomposition of the same weight), and the layer keeps A0, B0
(`init_factors`) so that the saved adapter can be converted to a plain LoRA of the original base
(`lora_ds.adapter.to_original_base`).
The base may be a bitsandbytes 4-bit Linear (QLoRA, `lora_ds.quantize`): W0·x is its forward, DoRA's norms use
its dequantized weight, and merging into 4-bit weights is refused (merge from the original base). OLoRA there
decomposes the dequantized weight and quantizes the fp32 residual anew (PEFT's `olora_init`), so the model starts
at the 4-bit base up to that requantization; PiSSA on a 4-bit base is refused, as PEFT refuses it.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn

from lora_ds.config import FieldError, LoraConfig
from lora_ds.quantize import dense_weight, is_quantized, requantized
from lora_ds.zero import gathered

# PEFT's shorthand for every Linear/Conv1D module but the output head.
ALL_LINEAR = "all-linear"


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's `get_pattern_key`: the value of the first key of `patterns` (a regex) that matches a whole trailing
    run of `name`'s dotted components (`(.*\\.)?(KEY)$`), else `default`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return patterns.get(name, default)


def unmatched_keys(patterns: dict, names) -> list[str]:
    """The keys of `patterns` that select none of `names` (PEFT warns of these; we refuse them)."""
    return [key for key in patterns if not any(re.match(rf"(.*\.)?({key})$", n) for n in names)]


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """s·B·A in fp32, laid out like the base weight ((in, out) for GPT-2's Conv1D)."""
    delta = (lora_B.float() @ lora_A.float()) * scale
    return delta.T if fan_in_fan_out else delta


def merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W0 + s·B·A in fp32, cast once to `dtype` (default: W0's dtype), checked finite after the cast (so that
    an fp16 overflow is caught too).

    The sum is `W0.float() + delta_weight(A, B, s, fan_in_fan_out)` (tests hold them bitwise equal), computed
    as one GEMM that accumulates into an fp32 copy of W0: one pass over the weight instead of three.
    """
    A, B = lora_A.float(), lora_B.float()
    m1, m2 = (A.T, B.T) if fan_in_fan_out else (B, A)  # (B·A)ᵀ = Aᵀ·Bᵀ for (in, out) weights
    merged = weight.to(torch.float32, copy=True).addmm_(m1, m2, alpha=scale).to(dtype or weight.dtype)
    # min and max are NaN or infinite iff some element is; much cheaper than isfinite over every element.
    if merged.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(merged)):
        raise FloatingPointError("LoRA merge produced non-finite weights")
    return merged


def weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """DoRA's ||W0 + s·B·A|| of each output feature (PEFT's `get_weight_norm`), in fp32, with no gradient."""
    with torch.no_grad():
        full = weight.float() + delta_weight(lora_A, lora_B, scale, fan_in_fan_out)
        return torch.linalg.vector_norm(full, dim=0 if fan_in_fan_out else 1)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """m / ||W0 + s·B·A|| in fp32, shaped to scale the rows (columns for (in, out) weights) of the weight."""
    factor = magnitude.float() / norm
    return factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1)


def dora_merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool,
    dtype: torch.dtype | None = None,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """m / ||W0 + s·B·A|| · (W0 + s·B·A), row-wise in fp32, cast once and checked finite (PEFT's DoRA merge).
    `norm`: the norms when `weight` holds only some input rows of an (in, out) weight (a block of a merge)."""
    full = merged_weight(weight, lora_A, lora_B, scale, fan_in_fan_out, torch.float32)
    if norm is None:
        norm = torch.linalg.vector_norm(full, dim=0 if fan_in_fan_out else 1)
    merged = full.mul_(dora_factor(magnitude, norm, fan_in_fan_out)).to(dtype or weight.dtype)
    if merged.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(merged)):
        raise FloatingPointError("DoRA merge produced non-finite weights")
    return merged


INITS = ("default", "gaussian", "pissa", "olora")  # and pissa_niter_N


def mutates_base(init) -> bool:
    """Whether `init` (an init_lora_weights value, ours or PEFT's) starts from a residual base W0 - s·B0·A0."""
    return isinstance(init, str) and (init in ("olora", "corda", "loftq", "lora_ga") or init.startswith("pissa"))


def pissa_niter(init: str) -> int | None:
    """N of `pissa_niter_N`; None for `pissa`. Raises ValueError for anything else."""
    if init == "pissa":
        return None
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    if match is None:
        raise ValueError(f"not pissa or pissa_niter_N: {init!r}")
    return int(match.group(1))


def base_init_factors(weight: torch.Tensor, r: int, scale: float, init: str, fan_in_fan_out: bool):
    """(A (r, in), B (out, r)) in fp32 of PEFT's `pissa_init` / `olora_init` on the full base `weight`.

    PiSSA: W0 = V·S·Uh, A = sqrt(S_r / s)·Uh_r, B = V_r·sqrt(S_r / s), so s·B·A is W0's best rank-r part.
    OLoRA: W0 = Q·R, A = R_r, B = Q_r (no division by s: PEFT's rule)."""
    w = weight.float()
    w = w.T if fan_in_fan_out else w  # (out, in)
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    niter = pissa_niter(init)
    if niter is None:
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scale, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=niter)
        Sr, Uhr = Sr / scale, Ur.t()
    return torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))


def residual_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """W0 - s·B·A in fp32 (PEFT's expression and order: W0 - (s·B)·A), cast once to W0's dtype."""
    w = weight.float()
    w = w.T if fan_in_fan_out else w
    residual = w - (scale * lora_B.float()) @ lora_A.float()
    return (residual.T if fan_in_fan_out else residual).to(weight.dtype)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class _LoRAAdd(torch.autograd.Function):
    """base + s·(x·Aᵀ)·Bᵀ, the update added into the base output with one GEMM (addmm, beta = 1).

    Saves x and the factors themselves, nothing of the output's size: backward recomputes x·Aᵀ (r columns).
    Saving the Parameters, not views of them, matters under ZeRO-3: between forward and backward their data
    is released and gathered again, and only the Parameter sees the gathered data.
    """

    @staticmethod
    def forward(ctx, base, x, lora_A, lora_B, scale):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scale = scale
        ax = x.reshape(-1, x.shape[-1]) @ lora_A.t()
        return torch.addmm(base.reshape(-1, base.shape[-1]), ax, lora_B.t(), alpha=scale).view(base.shape)

    @staticmethod
    def backward(ctx, grad):
        x, lora_A, lora_B = ctx.saved_tensors
        g, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        g_ax = (g @ lora_B) * ctx.scale  # d loss / d(x·Aᵀ)
        grad_x = (g_ax @ lora_A).view(x.shape) if ctx.needs_input_grad[1] else None
        grad_A = g_ax.t() @ flat_x if ctx.needs_input_grad[2] else None
        grad_B = (g.t() @ (flat_x @ lora_A.t())) * ctx.scale if ctx.needs_input_grad[3] else None
        return grad, grad_x, grad_A, grad_B, None


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (or GPT-2 `Conv1D`) plus a trainable low-rank update."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: str = "default",
    ):
        super().__init__()
        if _is_conv1d(base_layer):
            in_features, out_features = (
                base_layer.weight.ds_shape if hasattr(base_layer.weight, "ds_shape") else base_layer.weight.shape
            )
            self.fan_in_fan_out = True
        else:
            in_features, out_features = base_layer.in_features, base_layer.out_features
            self.fan_in_fan_out = False
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.scaling = lora_scale(r, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        # The factors take the base weight's dtype (bf16 in training: DeepSpeed keeps their fp32 master
        # copies), so the LoRA path runs in the same precision as the base GEMM with no casts.
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.merged = False
        if not mutates_base(init_lora_weights):  # PiSSA/OLoRA: set from the base by `init_from_base`
            self.reset_lora_parameters(init_lora_weights)
        # PiSSA/OLoRA: (A0, B0) in fp32 on the CPU, the factors W0 - s·B0·A0 (the residual base) was made with.
        self.init_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lora_A.to(base_layer.weight.dtype)
        self.lora_B.to(base_layer.weight.dtype)
        # DoRA's magnitude, set from the base weight by `init_magnitude` (which may need it gathered first).
        self.lora_magnitude_vector = (
            nn.Parameter(torch.ones(out_features, dtype=base_layer.weight.dtype)) if use_dora else None
        )
        self._merged_norm = None  # DoRA: the norm a merge divided by, which unmerge needs again

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """m <- ||W0 + s·B·A|| per output feature (PEFT's DoRA init). Needs the full base weight."""
        norm = weight_norm(
            dense_weight(self.base_layer.weight),
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            self.fan_in_fan_out,
        )
        self.lora_magnitude_vector.copy_(norm)

    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's `reset_lora_parameters`: A ~ kaiming_uniform(a=sqrt(5)) (default) or N(0, std 1/r) (gaussian),
        B = 0."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def init_from_base(self, init: str) -> None:
        """PiSSA / OLoRA: the factors from W0 (`base_init_factors`), then W0 <- W0 - s·B0·A0 with B0, A0 as this
        layer holds them (rounded to its dtype), kept in `init_factors`. Reads and writes the full base weight; a
        4-bit one (never partitioned here: a quantized base is partitioned by deepspeed.initialize) is replaced by
        its requantized residual."""
        weight = self.base_layer.weight
        dense = dense_weight(weight)
        A, B = base_init_factors(dense, self.r, self.scaling, init, self.fan_in_fan_out)
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        A0, B0 = self.lora_A.weight.float().cpu().clone(), self.lora_B.weight.float().cpu().clone()
        # PEFT quantizes a 4-bit base's residual from fp32, without a cast to the compute dtype first.
        source = dense.float() if is_quantized(weight) else weight
        device = weight.device
        residual = residual_weight(source, A0.to(device), B0.to(device), self.scaling, self.fan_in_fan_out)
        if is_quantized(weight):
            self.base_layer.weight = requantized(weight, residual)
        else:
            weight.copy_(residual)
        self.init_factors = (A0, B0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        weight_A, weight_B = self.lora_A.weight, self.lora_B.weight
        if self.use_dora:
            return result + self._dora_update(x, result)
        return _LoRAAdd.apply(
            result, x.to(result.dtype), weight_A.to(result.dtype), weight_B.to(result.dtype), self.scaling
        )

    def _dora_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output, as PEFT's `DoraLinearLayer.forward`: (m/||W|| - 1)·W0·x + m/||W||·s·B·A·x,
        where W0·x is the base output less its bias, or with dropout W0 applied to the dropped-out input (`x` here).
        Plain autograd: correctness first; the fused `_LoRAAdd` path stays plain LoRA's."""
        base = self.base_layer
        # The base weight is available inside the forward of its ZeRO-3 fetch unit (a decoder layer); per-module
        # fetching has released it after `base_layer`'s forward, so gather it (only then) for the norm.
        with gathered([base.weight]):
            W0 = dense_weight(base.weight)
            norm = weight_norm(W0, self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out)
        scale = (self.lora_magnitude_vector / norm.to(result.dtype)).to(result.dtype)
        if self.lora_dropout is None or not self.training:
            base_result = result
        else:
            base_result = base(x.to(result.dtype))
        if getattr(base, "bias", None) is not None:
            base_result = base_result - base.bias
        lora_result = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(result.dtype)
        return (scale - 1) * base_result + scale * lora_result * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out)

    def merge(self) -> None:
        """W0 <- W0 + s·B·A (fp32 math, one cast). Needs the full weights (gather first under ZeRO-3)."""
        if self.merged:
            return
        self._add_delta(+1)
        self.merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - s·B·A: back to the base weight, up to rounding in its dtype."""
        if not self.merged:
            return
        self._add_delta(-1)
        self.merged = False

    @torch.no_grad()
    def _add_delta(self, sign: int) -> None:
        weight = self.base_layer.weight
        if is_quantized(weight):
            raise RuntimeError("a LoRA layer on a 4-bit base cannot merge: merge into the original base's weights")
        if self.use_dora:
            weight.copy_(self._dora_merge(weight) if sign > 0 else self._dora_unmerge(weight))
            return
        weight.copy_(
            merged_weight(weight, self.lora_A.weight, self.lora_B.weight, sign * self.scaling, self.fan_in_fan_out)
        )

    def _dora_merge(self, weight: torch.Tensor) -> torch.Tensor:
        A, B, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        self._merged_norm = weight_norm(weight, A, B, self.scaling, self.fan_in_fan_out)
        return dora_merged_weight(weight, A, B, m, self.scaling, self.fan_in_fan_out, norm=self._merged_norm)

    def _dora_unmerge(self, weight: torch.Tensor) -> torch.Tensor:
        # PEFT's unmerge: W0 = W / (m/||W0 + s·B·A||) - s·B·A, with the norm the merge used.
        factor = dora_factor(self.lora_magnitude_vector, self._merged_norm, self.fan_in_fan_out)
        self._merged_norm = None
        return (weight.float() / factor - self.delta_weight()).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


def lora_modules(model: nn.Module):
    """(name, LoRALinear) pairs: adapter modules found by type, never by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module):
    """{"<module>.lora_A.weight": param, ...} of every LoRA layer in `model`."""
    params = {}
    for name, module in lora_modules(model):
        params[f"{name}.lora_A.weight"] = module.lora_A.weight
        params[f"{name}.lora_B.weight"] = module.lora_B.weight
        if module.use_dora:
            params[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector
    return params


def init_factors(model: nn.Module) -> dict:
    """{"<module>.lora_A.weight": A0, "<module>.lora_B.weight": B0, ...}: the PiSSA/OLoRA initial factors of each
    LoRA layer (fp32, CPU); {} for the other inits."""
    tensors = {}
    for name, module in lora_modules(model):
        if module.init_factors is not None:
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = module.init_factors
    return tensors


def is_target(name: str, targets) -> bool:
    """PEFT's rule: a list selects a module whose name equals one of its entries or ends with ".<entry>"; a
    string is a regular expression that must match the whole module name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def expand_all_linear(model: nn.Module, targets):
    """`targets`, with PEFT's `all-linear` (alone, any case) replaced by the modules it selects: every Linear/Conv1D
    but the output head. They are named by their last component (q_proj, ...), as LLaMA-Factory's `all` is, when
    those names select exactly these modules; else (a head whose last name an inner layer shares) by full name.
    Either way the adapter config lists names that PEFT matches as we do, not the shorthand."""
    if isinstance(targets, str) or [t.lower() for t in targets] != [ALL_LINEAR]:
        return targets
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if _is_linear(m) and m is not head]
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return short if match_targets(model, short) == names else names


def match_targets(model: nn.Module, targets) -> list[str]:
    """Names of Linear/Conv1D modules selected by `targets` (`is_target`)."""
    return [name for name, module in model.named_modules() if _is_linear(module) and is_target(name, targets)]


def inject_lora(
    model: nn.Module,
    targets,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    seed: int | None = None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    use_dora: bool = False,
    init_lora_weights: str = "default",
) -> list[str]:
    """Freeze `model` and wrap each target module in a LoRALinear. Returns the adapted module names.

    A module's rank and alpha are `rank_pattern`'s / `alpha_pattern`'s value for it (`pattern_value`, PEFT's
    rule), else `r` / `alpha`. With `seed`, the factors are drawn from a generator seeded with it, so every rank
    (and a single-process reference) gets identical initial adapters whatever RNG the base build consumed.
    With `use_dora`, each magnitude is set from its base weight, gathered one module at a time under ZeRO-3
    (collective then: every rank must call it). `init_lora_weights` (LoraConfig's): with pissa/olora each base
    weight is gathered in turn and every rank decomposes it; rank 0's residual is written back into the partitions
    (collective too).
    """
    # The training config's checks, naming the field (lora.r, ...) rather than a flag: merge and eval pass
    # values read from adapter_config.json.
    lora = LoraConfig(
        r=r,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
    )
    names = match_targets(model, targets)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise FieldError(
            "lora.targets",
            targets,
            f"matches no Linear/Conv1D module of this model; its linear module names are: {', '.join(linear)}",
        )
    for field in ("rank_pattern", "alpha_pattern"):
        unmatched = unmatched_keys(getattr(lora, field), names)
        if unmatched:
            raise FieldError(
                f"lora.{field}",
                unmatched[0],
                f"selects none of the {len(names)} adapted modules (a key is a regex matched against the end of a "
                f"module name, e.g. {names[0]} or layers\\.0\\..*)",
            )
    for p in model.parameters():
        p.requires_grad_(False)
    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            module_r = pattern_value(lora.rank_pattern, name, r)
            module_alpha = pattern_value(lora.alpha_pattern, name, alpha)
            layer = LoRALinear(base, module_r, module_alpha, dropout, rslora, use_dora, init_lora_weights)
            if mutates_base(init_lora_weights):
                _check_base_init(layer, name, init_lora_weights, module_r != r)
                with gathered([base.weight], modifier_rank=0):
                    layer.init_from_base(init_lora_weights)
            if use_dora:
                with gathered([base.weight]):
                    layer.init_magnitude()
            setattr(parent, child, layer)
    return names


def refuse_pissa_on_4bit(init: str, quantized: bool, what: str = "the base's Linear weights") -> None:
    """PiSSA on a 4-bit base (--quantize) is refused, as PEFT refuses it; OLoRA there is PEFT's too (it
    requantizes the residual)."""
    if quantized and mutates_base(init) and init != "olora":
        raise FieldError(
            "lora.init_lora_weights",
            init,
            f"{init} decomposes {what}, which --quantize nf4 holds in 4-bit; PEFT refuses PiSSA there too (it "
            "initialises PiSSA in full precision and quantizes the residual model afterwards); use olora, default "
            "or gaussian with --quantize",
        )


def _check_base_init(layer: LoRALinear, name: str, init: str, patterned: bool) -> None:
    """Refuse what PEFT's PiSSA/OLoRA get wrong: a rank above min(in, out) (PEFT silently keeps fewer factors
    than r), and OLoRA of a GPT-2 Conv1D (PEFT decomposes its (in, out) weight untransposed: A and B of the
    wrong shapes). And PiSSA on a 4-bit base (`refuse_pissa_on_4bit`)."""
    refuse_pissa_on_4bit(init, is_quantized(layer.base_layer.weight), f"{name}'s weight")
    if layer.r > min(layer.in_features, layer.out_features):
        field, value = ("lora.rank_pattern", layer.r) if patterned else ("lora.r", layer.r)
        raise FieldError(
            field,
            value,
            f"{init} takes r singular vectors of each weight; {name} is {layer.out_features} x {layer.in_features}, "
            f"so r can be at most {min(layer.in_features, layer.out_features)}",
        )
    if init == "olora" and layer.fan_in_fan_out:
        raise FieldError(
            "lora.init_lora_weights",
            init,
            f"{name} is a GPT-2 Conv1D, whose (in, out) weight PEFT's OLoRA decomposes untransposed (its factors "
            "then do not fit the layer); use pissa",
        )
