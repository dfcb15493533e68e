"""FP8 (e4m3) weights, as vLLM serves them, written as compressed-tensors `float-quantized` (llm-compressor's
FP8_DYNAMIC / FP8_BLOCK / FP8 weight-only presets). Round-to-nearest onto e4m3, no calibration (llm-compressor's
FP8 recipes use no calibration data either), streamed layer by layer like RTN; or (`weights: gptq`) GPTQ's column
loop onto the same grid, calibrated like GPTQ (`gptq_solver`).

    dynamic   weights per output channel, scale[o] = max|W[o, :]| / 448; inputs per token, dynamic (the engine)
    block     weights per 128 × 128 block, scale[b_o, b_i] = max|W_block| / 448; inputs per 1 × 128 group of each
              token, dynamic (DeepSeek-V3's layout)
    w8a16     the weights of `dynamic`, inputs left in 16 bits

    q = e4m3(clamp(W / scale, −448, 448))      (torch's cast: round to nearest even)      W ≈ q · scale

The scale is rounded to the artefact's storage dtype first, so the codes reproduce from the stored scale.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantize.common.errors import QuantizeError
from quantize.formats.compressed_tensors import Stored
from quantize.methods import grids
from quantize.methods.configs import Fp8Method, GptqMethod, RtnMethod
from quantize.methods.gptq import ColumnGrid, gptq_quantize
from quantize.methods.weight_only import Solved, build_streamed, scale_dtype
from quantize.sources.models import BaseModel, ignored

Config = Fp8Method

FP8_MAX = 448.0  # the largest e4m3fn value
BLOCK = 128


def fp8_codes(W: torch.Tensor, scale: torch.Tensor, group_size: int = -1) -> torch.Tensor:
    """W [rows, cols] on the e4m3 grid of scale [rows, groups], as float32 values of e4m3 numbers."""
    G = grids._groups(W.float(), group_size) / scale[..., None]
    return G.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float().reshape(W.shape)


def channel_scale(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return grids.storable_scale(W.float().abs().amax(dim=1, keepdim=True) / FP8_MAX, dtype)  # [rows, 1]


def block_scale(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One scale per 128 × 128 block, repeated over each block's rows: [rows, cols / 128]."""
    rows, cols = W.shape
    blocks = W.float().abs().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).amax(dim=(1, 3)) / FP8_MAX
    return grids.storable_scale(blocks, dtype).repeat_interleave(BLOCK, dim=0)


def solver(scheme: str, dtype: torch.dtype):
    def solve(W, hess, group_size: int, bits: int) -> Solved:
        scale = block_scale(W, dtype) if scheme == "block" else channel_scale(W, dtype)
        q = fp8_codes(W, scale, group_size)
        row_loss = ((grids.dequantize(q, scale, torch.zeros_like(scale), group_size) - W.float()) ** 2).sum(dim=1)
        return Solved(q, scale, torch.zeros_like(scale), row_loss, 0.0)
    return solve


def gptq_solver(method: Fp8Method, dtype: torch.dtype):
    """The per-linear solve with GPTQ's error feedback onto the scheme's e4m3 grid: per channel, the scales from the
    original weights (one group: GPTQ's static grid); per 128 × 128 block, each column block's scales when the loop
    reaches it, from the weights with the feedback so far (as GPTQ's groups)."""
    def fit(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (block_scale if method.scheme == "block" else channel_scale)(columns, dtype)[:, 0]
        return scale, torch.zeros_like(scale)

    def round_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = fp8_codes(w[:, None], s[:, None])[:, 0]
        return q, q * s

    grid = ColumnGrid(fit, round_column, torch.float32)

    def solve(W, hess, group_size: int, bits: int) -> Solved:
        return gptq_quantize(W, hess, 8, True, group_size, damp=method.damp, grid=grid)
    return solve


def stored(scheme: str) -> Stored:
    """The compressed-tensors arguments of each scheme, as its FP8 presets (quant_scheme.py) name them."""
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "block":
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="block",
                                   block_structure=[BLOCK, BLOCK])
        inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="group", group_size=BLOCK,
                                  dynamic=True)
    else:
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    return Stored(weights, None if scheme == "w8a16" else inputs)


def check_blocks(meta: torch.nn.Module, method: Fp8Method) -> None:
    """Every quantized linear of the block scheme holds whole 128 × 128 blocks (vLLM's block kernels take K blocks
    of 128 only); a clear error naming the linears otherwise."""
    if method.scheme != "block":
        return
    bad = [f"{n} [{m.out_features} × {m.in_features}]" for n, m in meta.named_modules()
           if isinstance(m, torch.nn.Linear) and ".layers." in n and not ignored(n, method.ignore)
           and (m.in_features % BLOCK or m.out_features % BLOCK)]
    if bad:
        raise QuantizeError(f"scheme block quantizes 128 × 128 weight blocks; {len(bad)} linears are not made of "
                            f"whole blocks: {', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}. Use scheme dynamic "
                            "(per channel), or add them to `ignore`")


def build(method: Fp8Method, base: BaseModel, out_dir: Path, calib=None, calib_info=None) -> dict:
    from quantize.sources.models import meta_model

    check_blocks(meta_model(base.path), method)
    shared = dict(bits=8, group_size=BLOCK if method.scheme == "block" else -1, sym=True, ignore=method.ignore,
                  variant=method.default_variant())
    if method.weights == "gptq":
        streamed = GptqMethod(name="gptq", damp=method.damp, device=method.device,
                              forward_dtype=method.forward_dtype, **shared)
        info = build_streamed(streamed, base, out_dir, calib, gptq_solver(method, scale_dtype(streamed, base)),
                              stored=stored(method.scheme))
    else:
        rtn = RtnMethod(name="rtn", **shared)
        info = build_streamed(rtn, base, out_dir, None, solver(method.scheme, scale_dtype(rtn, base)),
                              stored=stored(method.scheme))
    inputs = {"dynamic": "fp8 e4m3 per token, dynamic (quantized by the engine at run time)",
              "block": "fp8 e4m3 per 1 × 128 group of each token, dynamic (quantized by the engine at run time)",
              "w8a16": "16-bit (weights only)"}[method.scheme]
    return {"scheme": f"fp8-{method.scheme}", "weights": method.weights, "activations": inputs, **info}
