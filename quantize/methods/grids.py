"""Round-to-nearest integer grids: the primitives every weight-only method shares.

Conventions (as in the GPTQ reference and compressed-tensors): a weight row W[o, :] is cut into groups of
`group_size` input columns (-1: one group per row, i.e. per output channel). Each group has a `scale` and,
when asymmetric, an integer `zero`, and

    q = clamp(round(W / scale) + zero, qmin, qmax)        W ≈ (q - zero) · scale

Symmetric grids use zero = 0, q ∈ [-2^(b-1), 2^(b-1) - 1] and scale = max|W| / ((qmax - qmin) / 2), i.e.
max|W| / 7.5 at 4 bits: all 2^b levels are used and the clamped extreme is off by at most half a step (the GPTQ
reference's and compressed-tensors' choice). Asymmetric grids use q ∈ [0, 2^b - 1].
"""

from __future__ import annotations

import torch


def grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of a signed symmetric or unsigned asymmetric b-bit grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _groups(W: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = W.shape
    if group_size == -1:
        return W.reshape(rows, 1, cols)
    assert cols % group_size == 0, f"{cols} input columns are not divisible by group_size {group_size}"
    return W.reshape(rows, cols // group_size, group_size)  # [rows, n_groups, group_size]


def scale_zero(W: torch.Tensor, bits: int, symmetric: bool, group_size: int = -1):
    """Scale (and zero point) per (row, group) from min/max. Shapes [rows, n_groups]."""
    lo, hi = torch.aminmax(_groups(W.float(), group_size), dim=-1)  # one pass over W
    return _scale_zero_of_range(lo.clamp(max=0), hi.clamp(min=0), bits, symmetric)


def _scale_zero_of_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """The grid that spans [lo, hi] (lo ≤ 0 ≤ hi); symmetric grids span ±max(−lo, hi)."""
    qmin, qmax = grid(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(-lo / scale.clamp(min=1e-12)) + qmin
    scale = scale.clamp(min=1e-12)  # an all-zero group quantises to zeros, not NaN
    return scale, zero


def scale_zero_mse(W: torch.Tensor, bits: int, symmetric: bool, group_size: int = -1, norm: float = 2.4,
                   steps: int = 100, max_shrink: float = 0.8):
    """Scale (and zero) per (row, group) minimising Σ |Q(w) − w|^norm over the group, searched over the shrunk
    ranges p·[min, max] for p = 1, 1 − 1/steps, …, down to 1 − max_shrink: the GPTQ reference's `mse` option
    (IST-DASLab gptq quant.py, find_params; norm 2.4, grid 100, maxshrink 0.8), llm-compressor's "mse" observer.
    Clipping the few largest weights buys a finer step for all the others. p = 1 is min/max, so the result is never
    worse than scale_zero on this objective. Shapes [rows, n_groups]."""
    G = _groups(W.float(), group_size)  # [rows, n_groups, group_size]
    lo, hi = G.amin(dim=-1).clamp(max=0), G.amax(dim=-1).clamp(min=0)
    qmin, qmax = grid(bits, symmetric)

    def error(scale, zero):
        q = _codes(G, scale, zero, qmin, qmax)
        return ((q - zero[..., None]) * scale[..., None] - G).abs_().pow_(norm).sum(dim=-1)

    best_scale, best_zero = _scale_zero_of_range(lo, hi, bits, symmetric)
    best_err = error(best_scale, best_zero)
    for i in range(1, int(max_shrink * steps)):
        p = 1 - i / steps
        scale, zero = _scale_zero_of_range(p * lo, p * hi, bits, symmetric)
        err = error(scale, zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def storable_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The scale as the artefact stores it (fp16), back in float32, never 0: a tiny or all-zero group's scale would
    underflow to 0 in fp16 and turn its codes into 0/0. The smallest normal fp16 (6.1e-5) still codes such a group
    to within half of it."""
    return scale.to(dtype).float().clamp(min=torch.finfo(dtype).tiny)


OBSERVERS = {"minmax": scale_zero, "mse": scale_zero_mse}  # how a group's grid is chosen (recipe `observer`)


def quantize(W, scale, zero, bits: int, symmetric: bool, group_size: int = -1) -> torch.Tensor:
    """Integer codes of W on the given grid, same shape as W (int32)."""
    q = _codes(_groups(W.float(), group_size), scale, zero, *grid(bits, symmetric))
    return q.reshape(W.shape).to(torch.int32)


def _codes(G: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Codes (as floats) of grouped weights G [rows, n_groups, group_size] on grids [rows, n_groups]."""
    return torch.clamp(torch.round(G / scale[..., None]) + zero[..., None], qmin, qmax)


def dequantize(q, scale, zero, group_size: int = -1) -> torch.Tensor:
    G = _groups(q.float(), group_size)
    return ((G - zero[..., None]) * scale[..., None]).reshape(q.shape)


def fake_quantize(W, bits: int, symmetric: bool, group_size: int = -1) -> torch.Tensor:
    """W rounded onto its own min/max grid, back in float: the RTN baseline. The same numbers as
    dequantize(quantize(W, …), …) (codes are whole numbers either way), computed in place in one buffer: AWQ's
    searches call it once per grid point."""
    G = _groups(W.float(), group_size)
    lo, hi = torch.aminmax(G, dim=-1)
    scale, zero = _scale_zero_of_range(lo.clamp(max=0), hi.clamp(min=0), bits, symmetric)
    qmin, qmax = grid(bits, symmetric)
    scale, zero = scale[..., None], zero[..., None]
    return (G / scale).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale).reshape(W.shape)
