"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), in the paper's notation, after the reference implementation (IST-DASLab/gptq `gptq.py`).

For one linear layer with weight W [rows, cols] and calibration inputs X [tokens, cols]:

    H = 2/n · Σ XᵀX                      (accumulate_hessian; n = tokens seen)
    H += damp · mean(diag H) · I         (dampening)
    Hinv = cholesky(H⁻¹)ᵀ                (upper Cholesky factor of the inverse)
    for each column block, for each column j:
        q_j   = quant(w_j)               (on the group's grid)
        err_j = (w_j − q_j) / Hinv[j, j]
        W[:, j:] −= err_j · Hinv[j, j:]  (error feedback to the not yet quantized columns)
    loss = Σ (w_j − q_j)² / Hinv[j, j]² / 2

`act_order` visits columns by descending diag(H) with *static groups*: each group's scale and zero are fixed
from the original weights in natural column order before the loop, so the artefact needs no g_idx and keeps
contiguous groups (compressed-tensors `actorder: weight`). Without act_order, a group's grid is computed when the
loop reaches the group's first column: by default from the weights with all the error feedback so far, or, with
`group_grid: reference`, from W as the reference reads it (see GROUP_GRIDS). A group's grid
is its min/max (`observer: minmax`, the reference's default) or the reference's `mse` shrink search
(grids.scale_zero_mse). The Hessian is gathered by methods/statistics.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from quantize.methods import grids
from quantize.methods.configs import GptqMethod
from quantize.methods.statistics import Hessian
from quantize.methods.weight_only import Solved, build_streamed, scale_dtype, scheme_name


# Where a group's grid comes from when groups are not static (no act_order): "updated", the weights as they are
# when the loop reaches the group's first column, with the error feedback of every column before it (ours, the
# default); "reference", W as IST-DASLab's fasterquant and llm-compressor read it, `W[:, i1 + i : i1 + i + gs]`,
# whose columns in the current block have the earlier blocks' feedback but not this block's (they differ only when
# group_size < block_size). bench/gptq_group_grid.py measures both.
GROUP_GRIDS = ("updated", "reference")


@dataclass(frozen=True)
class ColumnGrid:
    """What GPTQ rounds onto: `fit(block [rows, k]) → (scale, zero)` [rows] each, a group's grid from its columns,
    and `round(w [rows], scale, zero) → (code, value)`, one column's codes and the weights they stand for. The
    integer min/max grid (integer_grid) is GPTQ's own; methods/fp4.py gives NVFP4's and MXFP4's e2m1 grids."""

    fit: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    round: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    code_dtype: torch.dtype = torch.int32


def integer_grid(bits: int, symmetric: bool, observer: str = "minmax",
                 scale_dtype: torch.dtype = torch.float16) -> ColumnGrid:
    """The integer grid of `bits` (symmetric, or asymmetric with a zero point), scales from the `observer` and
    rounded to what `scale_dtype` stores."""
    qmin, qmax = grids.grid(bits, symmetric)

    def fit(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = grids.OBSERVERS[observer](block, bits, symmetric)
        return grids.storable_scale(s[:, 0], scale_dtype), z[:, 0]

    def round_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        return q, (q - z) * s

    return ColumnGrid(fit, round_column)


def gptq_quantize(W: torch.Tensor, hess: Hessian, bits: int, symmetric: bool, group_size: int = -1,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  scale_dtype: torch.dtype = torch.float16, observer: str = "minmax", group_grid: str = "updated",
                  grid: ColumnGrid | None = None) -> Solved:
    """`grid`: what the columns are rounded onto (default: the integer grid of bits/symmetric/observer)."""
    assert group_grid in GROUP_GRIDS, group_grid
    grid = grid or integer_grid(bits, symmetric, observer, scale_dtype)
    W = W.clone().float()
    H = hess.H  # a new float32 tensor (statistics.Hessian)
    rows, cols = W.shape
    assert group_size == -1 or cols % group_size == 0, f"{cols} columns not divisible by group_size {group_size}"
    dead = torch.diag(H) == 0  # inputs that were always zero: any value is exact
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = 1 if group_size == -1 else cols // group_size
    gs = cols if group_size == -1 else group_size
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros(rows, n_groups, device=W.device)

    def set_group(g: int, block: torch.Tensor) -> None:
        scale[:, g], zero[:, g] = grid.fit(block)

    static = group_size == -1 or act_order
    if static:
        for g in range(n_groups):
            set_group(g, W[:, g * gs : (g + 1) * gs])

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm]  # one permutation at a time: at most two cols² copies alive
        H = H[:, perm]
    invperm = torch.argsort(perm)

    damp_abs = damp * torch.mean(torch.diag(H)).item()
    H.diagonal().add_(damp_abs)
    # one step at a time, each input dropped once used: two cols² float32 matrices alive at most (with the caller's
    # float64 sum, 4 × cols² × 4 bytes: the solver term of fit/build_memory.py)
    L = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    Hinv = torch.linalg.cholesky(Hinv, upper=True)

    Q = torch.zeros(rows, cols, dtype=grid.code_dtype, device=W.device)  # the codes (small integers: exact)
    losses = torch.zeros(rows, device=W.device)
    order = perm.tolist()  # column i of the loop is column order[i] of the weight in natural order
    d_all = Hinv.diagonal().tolist()
    g_now = -1
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // gs
            if not static and col % gs == 0 and group_grid == "reference":
                # the reference's grid: W's columns have the earlier blocks' feedback, not this block's so far
                set_group(g, W[:, i1 + i : i1 + i + gs])
            elif not static and col % gs == 0:  # the group's grid from the weights as they are now
                if i + gs <= i2 - i1:
                    group = W1[:, i : i + gs]
                else:  # the group runs past this block: its later columns still lack this block's feedback so far
                    later = W[:, i2 : i1 + i + gs] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2 : i1 + i + gs]
                    group = torch.cat([W1[:, i:], later], dim=1)
                set_group(g, group)  # a new group: g differs from g_now, so its grid is fetched below
            if g != g_now:
                s, z, g_now = scale[:, g].contiguous(), zero[:, g].contiguous(), g
            w = W1[:, i]
            q, value = grid.round(w, s, z)
            Q[:, i1 + i] = q
            err = (w - value) / d_all[i1 + i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # error feedback to the columns still to come
            Err1[:, i] = err
        losses += Err1.pow(2).sum(dim=1) / 2  # (w − q)² / Hinv_jj² / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return Solved(Q[:, invperm] if act_order else Q, scale, zero, losses, damp_abs)


# ---- the method: streamed layer by layer, written as compressed-tensors (or a classic layout) ----------------
Config = GptqMethod


def solver(method: GptqMethod, dtype: torch.dtype):
    """The per-linear solve (weight_only.build_streamed's `solve`), scales stored in `dtype`."""
    def solve(W, hess: Hessian, group_size: int, bits: int) -> Solved:
        return gptq_quantize(W, hess, bits, method.sym, group_size, method.act_order, method.damp,
                             method.block_size, scale_dtype=dtype, observer=method.observer,
                             group_grid=method.group_grid)
    return solve


def build(method: GptqMethod, base, out_dir, calib: torch.Tensor, calib_info=None, keep: dict | None = None) -> dict:
    solve = solver(method, scale_dtype(method, base))
    return {"scheme": scheme_name(method), **build_streamed(method, base, out_dir, calib, solve, keep)}

