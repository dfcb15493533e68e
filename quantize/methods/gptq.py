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
contiguous groups (compressed-tensors `actorder: weight`). Without act_order, a group's grid is computed from
the error-updated weights when the loop reaches the group's first column, as the reference does. A group's grid
is its min/max (`observer: minmax`, the reference's default) or the reference's `mse` shrink search
(rtn.scale_zero_mse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantize import rtn


@dataclass
class Hessian:
    H: torch.Tensor  # [cols, cols], float32
    n: int = 0

    @classmethod
    def zeros(cls, cols: int, device=None) -> "Hessian":
        return cls(torch.zeros(cols, cols, dtype=torch.float32, device=device))


def accumulate_hessian(hess: Hessian, X: torch.Tensor) -> None:
    """Running mean of 2·XᵀX over all tokens seen; X is [..., cols]. float32 throughout."""
    X = X.reshape(-1, X.shape[-1]).float()
    tokens = X.shape[0]
    hess.H *= hess.n / (hess.n + tokens)
    hess.n += tokens
    hess.H += gram(X, 2 / hess.n)


def gram(X: torch.Tensor, alpha: float, block: int = 256) -> torch.Tensor:
    """alpha·XᵀX for X [tokens, cols]. The product is symmetric, so only the blocks on and above the diagonal are
    multiplied (a blocked syrk): ~60% of a full matmul's multiply-adds at 1536 columns. On SmolLM2-135M with
    32×512 calibration tokens the Hessians took 11.9 s instead of 17.3 s (2 CPU threads)."""
    cols = X.shape[1]
    G = torch.empty(cols, cols, dtype=X.dtype, device=X.device)  # the only cols² buffer: Hessians can be large
    for i in range(0, cols, block):
        j = min(i + block, cols)
        G[i:j, i:] = X[:, i:j].T @ X[:, i:]  # block row i, from the diagonal on
        D = G[i:j, i:j]
        G[i:j, i:j] = D.triu() + D.triu(1).T  # the diagonal block exactly symmetric: its upper triangle mirrored
        G[j:, i:j] = G[i:j, j:].T  # the blocks below the diagonal mirror those right of it
    return G.mul_(alpha)


@dataclass
class GptqResult:
    q: torch.Tensor  # integer codes [rows, cols] (int32, natural column order)
    scale: torch.Tensor  # [rows, n_groups]
    zero: torch.Tensor  # [rows, n_groups]
    row_loss: torch.Tensor  # [rows]: Σ_j (w − q)² / Hinv_jj² / 2 per output row
    damp: float  # the absolute dampening added to diag(H)

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())


def gptq_quantize(W: torch.Tensor, hess: Hessian, bits: int, symmetric: bool, group_size: int = -1,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  scale_dtype: torch.dtype = torch.float16, observer: str = "minmax") -> GptqResult:
    W = W.clone().float()
    H = hess.H.clone()
    rows, cols = W.shape
    assert group_size == -1 or cols % group_size == 0, f"{cols} columns not divisible by group_size {group_size}"
    qmin, qmax = rtn.grid(bits, symmetric)
    dead = torch.diag(H) == 0  # inputs that were always zero: any value is exact
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = 1 if group_size == -1 else cols // group_size
    gs = cols if group_size == -1 else group_size
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros(rows, n_groups, device=W.device)

    def set_group(g: int, block: torch.Tensor) -> None:
        s, z = rtn.OBSERVERS[observer](block, bits, symmetric)
        scale[:, g], zero[:, g] = rtn.storable_scale(s[:, 0], scale_dtype), z[:, 0]

    static = group_size == -1 or act_order
    if static:
        for g in range(n_groups):
            set_group(g, W[:, g * gs : (g + 1) * gs])

    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    invperm = torch.argsort(perm)

    damp_abs = damp * torch.mean(torch.diag(H)).item()
    H.diagonal().add_(damp_abs)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    del H

    Q = torch.zeros(rows, cols, device=W.device)
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
            if not static and col % gs == 0:  # the group's grid from the weights as they are now
                if i + gs <= i2 - i1:
                    group = W1[:, i : i + gs]
                else:  # the group runs past this block: its later columns still lack this block's feedback so far
                    later = W[:, i2 : i1 + i + gs] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2 : i1 + i + gs]
                    group = torch.cat([W1[:, i:], later], dim=1)
                set_group(g, group)  # a new group: g differs from g_now, so its grid is fetched below
            if g != g_now:
                s, z, g_now = scale[:, g].contiguous(), zero[:, g].contiguous(), g
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
            Q[:, i1 + i] = q
            err = (w - (q - z) * s) / d_all[i1 + i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # error feedback to the columns still to come
            Err1[:, i] = err
        losses += Err1.pow(2).sum(dim=1) / 2  # (w − q)² / Hinv_jj² / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return GptqResult(Q[:, invperm].to(torch.int32), scale, zero, losses, damp_abs)


# ---- the method: streamed layer by layer, written as compressed-tensors -------------------------------------
def build(method, base, out_dir, calib: torch.Tensor, calib_info=None):
    from quantize.methods.weight_only import build_streamed

    def quantize_linear(W, hess: Hessian, group_size: int):
        r = gptq_quantize(W, hess, method.bits, method.sym, group_size, method.act_order, method.damp,
                          method.block_size, observer=method.observer)
        return r.q, r.scale, r.zero, r.row_loss, r.damp

    return {"scheme": f"w{method.bits}a16", **build_streamed(method, base, out_dir, calib, quantize_linear)}


def estimate_bytes(method, meta_model) -> int:
    from quantize.methods.round import weight_only_bytes

    return weight_only_bytes(method, meta_model)
