"""SmoothQuant (Xiao et al., 2022, arXiv:2211.10438): move the activations' outlier channels into the weights
before W8A8, by a per-input-channel scale folded exactly into the op before the linears.

For each norm that feeds a set of linears (the architecture row's AWQ mappings whose `prev` is a norm: q/k/v
after the input norm, gate/up after the post-attention norm; llm-compressor's default SmoothQuant mappings), with
X the norm's output on the calibration tokens and W the linears' weights stacked by rows:

    s_j = max|X_j|^α / max|W_j|^(1−α)          j an input channel; α = `smoothing_strength` (0.8 as llm-compressor)
    X' = X · diag(s)⁻¹  (folded into the norm's weight)      W' = W · diag(s)  (the linears' columns)

so X'·W'ᵀ = X·Wᵀ exactly in full precision (tests/test_w8a8.py measures it), while the per-token int8 grid of X'
loses less to its largest channels. The fold is AWQ's (awq.fold_scale); only the scale differs. In a sparse MoE
block the router reads the same norm output: its columns take s too, and it stays unquantized.
"""

from __future__ import annotations

import torch

from quantize.methods.activations import Activations
from quantize.methods.awq import fold_scale
from quantize.methods.experts import capture, norm_readers


def smoothing_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] from the activations' per-channel max |X| [in] and the linears' weights (each [out_k, in])."""
    w_max = torch.cat([W.abs().float() for W in weights]).amax(dim=0)
    s = x_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def norm_rows(layer: torch.nn.Module, rows) -> list[tuple[str, list[str], str]]:
    """The rows SmoothQuant smooths: those whose `prev` is a norm, not a linear (v→o, up→down: AWQ scales them,
    llm-compressor's SmoothQuant does not)."""
    return [r for r in rows if not isinstance(layer.get_submodule(r[0]), torch.nn.Linear)]


def smooth_layer(layer: torch.nn.Module, acts: Activations, rows, alpha: float, norm_offset: float = 0.0) -> list[dict]:
    """Smooth one decoder layer in place on the activations entering it; one log row per smoothed norm (the
    largest activation channel before and after, which is what the int8 activation grid sees)."""
    rows = norm_rows(layer, rows)
    moe = {block for _, names, block in rows if len({n.rpartition(".")[0] for n in names}) > 1}
    seen, _, _ = capture(acts, layer, sorted({block if block in moe else names[0] for _, names, block in rows}))
    log = []
    for prev_name, names, block in rows:
        X = seen[block if block in moe else names[0]]
        x_max = X.reshape(-1, X.shape[-1]).abs().amax(dim=0).float()
        linears = [layer.get_submodule(n) for n in names]
        s = smoothing_scales(x_max, [lin.weight.data for lin in linears], alpha).to(x_max.device)
        s = fold_scale(layer.get_submodule(prev_name), linears, s, norm_offset)
        if block in moe:  # the router reads the norm's output too
            for reader in norm_readers(layer.get_submodule(block)):
                reader.weight.data = reader.weight.data * s
        log.append({"norm": prev_name, "linears": names, "act_max_before": float(x_max.max()),
                    "act_max_after": float((x_max / s).max())})
    return log
